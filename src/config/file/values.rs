//! The file's scalar values: `${ENV}` substitution, and each kind of value (addresses, paths,
//! tokens, secrets, durations, counts) checked as serde reads it, so an error carries the
//! scalar's line and column.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::auth::{check_path, Digest, PathScope};

thread_local! {
    /// The variables the config being parsed on this thread names, with their values.
    pub(in crate::config) static ENV: RefCell<HashMap<String, Option<String>>> = RefCell::new(HashMap::new());
}

/// Every `${NAME}` in `text`.
pub(in crate::config) fn referenced_vars(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        rest = &rest[start + 2..];
        if let Some(end) = rest.find('}') {
            names.push(rest[..end].to_string());
            rest = &rest[end + 1..];
        }
    }
    names
}

/// Why a value of the file is refused (the message names the rule; serde adds where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

/// Replaces `${NAME}` in `value`; an unset or malformed reference is an error.
pub(super) fn substitute(value: &str) -> Result<String, BadValue> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(BadValue(format!("unterminated `${{` in `{value}`")));
        };
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(BadValue(format!(
                "`${{{name}}}` is not a valid variable name"
            )));
        }
        let found = ENV.with(|cell| cell.borrow().get(name).cloned().flatten());
        match found {
            Some(v) => out.push_str(&v),
            None => return Err(BadValue(format!("environment variable {name} is not set"))),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads a string scalar, substitutes `${ENV}`, then parses it with the given function. Errors
/// are raised inside the visitor, so serde_yaml marks them with the scalar's line and column.
pub(super) struct ParseVisitor<T>(pub(super) fn(&str) -> Result<T, String>);

impl<T> Visitor<'_> for ParseVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let text = substitute(v).map_err(E::custom)?;
        (self.0)(&text).map_err(E::custom)
    }
}

/// A string with `${ENV}` substituted.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EnvString(pub(super) String);

/// Implements `Deserialize` for a type parsed from an env-substituted string.
macro_rules! from_env_string {
    ($ty:ty, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(ParseVisitor::<$ty>($parse))
            }
        }
    };
}

from_env_string!(EnvString, |s| Ok(EnvString(s.to_string())));

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Addr(pub(super) SocketAddr);
from_env_string!(Addr, |s| s
    .parse()
    .map(Addr)
    .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080")));

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Cidr(pub(super) ipnet::IpNet);
from_env_string!(Cidr, |s| {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(Cidr)
        .map_err(|_| format!("`{s}` is not an address or CIDR like 10.0.0.0/8"))
});

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Scope(pub(super) PathScope);
from_env_string!(Scope, |s| PathScope::parse(s)
    .map(Scope)
    .map_err(|e| e.to_string()));

#[derive(Debug, Clone, PartialEq)]
pub(super) struct EndpointPath(pub(super) String);
from_env_string!(EndpointPath, |s| check_path(s)
    .map(|()| EndpointPath(s.to_string()))
    .map_err(|e| e.to_string()));

#[derive(Debug, Clone)]
pub(super) struct TokenValue(pub(super) Digest);
from_env_string!(TokenValue, |s| {
    if let Some(hex_digits) = s.strip_prefix("sha256:") {
        return Digest::from_hex(hex_digits)
            .map(TokenValue)
            .ok_or_else(|| "`sha256:` must be followed by 64 hex digits".to_string());
    }
    if s.is_empty() {
        return Err("a token must not be empty".into());
    }
    if s.len() < 16 {
        return Err("a token must have at least 16 characters".into());
    }
    Ok(TokenValue(Digest::of(s.as_bytes())))
});

#[derive(Debug, Clone)]
pub(super) struct Secret(pub(super) Digest, pub(super) usize);
from_env_string!(Secret, |s| {
    if s.is_empty() {
        return Err("a secret must not be empty".into());
    }
    Ok(Secret(Digest::of(s.as_bytes()), s.len()))
});

/// The longest duration any setting takes.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration between 1 ms and [`MAX_DURATION`], or `0`: `250ms`, `10s`, `5m`, `1h`. Whether 0
/// is allowed is the field's business ([`Dur::nonzero`]); every other value out of range is an
/// error raised while reading, so it carries its line and column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dur(pub(super) Duration);

/// A duration between 1 ms and [`MAX_DURATION`] (no 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PositiveDur(pub(super) Duration);

impl<'de> Deserialize<'de> for PositiveDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor { zero: false })
            .map(|Dur(t)| PositiveDur(t))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor { zero: true })
    }
}

/// Reads a duration. Every error is raised inside the visitor, so serde_yaml marks it with the
/// scalar's own line and column.
pub(super) struct DurVisitor {
    /// Whether `0` is allowed.
    zero: bool,
}

impl DurVisitor {
    fn check<E: de::Error>(&self, t: Duration) -> Result<Dur, E> {
        if t.is_zero() && !self.zero {
            return Err(E::custom(
                "must be between 1ms and 7 days (0 is not allowed here)",
            ));
        }
        Ok(Dur(t))
    }
}

impl Visitor<'_> for DurVisitor {
    type Value = Dur;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration like 250ms, 10s, 5m or 1h")
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
        if n == 0 {
            return self.check(Duration::ZERO);
        }
        Err(E::custom(format!(
            "`{n}` needs a unit: {n}ms, {n}s, {n}m or {n}h"
        )))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom("a duration cannot be negative")),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
        let text = substitute(v).map_err(E::custom)?;
        let t = parse_duration(&text).map_err(E::custom)?;
        self.check(t)
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h` or `0`; anything from 1 ms to 7 days (or 0).
pub fn parse_duration(text: &str) -> Result<Duration, BadValue> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let not_a_duration = || {
        BadValue(format!(
            "`{text}` is not a duration like 250ms, 10s, 5m or 1h"
        ))
    };
    let out_of_range = || {
        BadValue(format!(
            "`{text}` is out of range: a duration is between 1ms and 7 days"
        ))
    };
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        // All digits, but too many for a u64.
        Err(_) if !digits.is_empty() && ["ms", "s", "m", "h"].contains(&unit) => {
            return Err(out_of_range())
        }
        Err(_) => return Err(not_a_duration()),
    };
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(not_a_duration()),
    };
    match millis.map(Duration::from_millis) {
        Some(d) if !d.is_zero() && d <= MAX_DURATION => Ok(d),
        Some(d) if d.is_zero() => Ok(Duration::ZERO),
        _ => Err(out_of_range()),
    }
}

/// A count that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Count(pub(super) usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        usize::try_from(n)
            .map(Count)
            .map_err(|_| de::Error::custom("too large"))
    }
}
