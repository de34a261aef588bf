//! The Duplex handshake: the connecting side sends `SIMPLEX/1.0;json`, the accepting side answers
//! `+OK`, or a frame starting with `-ERR` and a reason.

/// The handshake frame this project speaks.
pub const HANDSHAKE: &str = "SIMPLEX/1.0;json";
/// The accepting side's answer.
pub const ACCEPT: &str = "+OK";

const PROTOCOL: &str = "SIMPLEX";
const VERSION: &str = "1.0";
const CODEC: &str = "json";

/// Why a handshake is refused: the reason to send after `-ERR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Checks a connecting peer's handshake frame. `Err` holds the reason to send after `-ERR`.
pub fn check(frame: &[u8]) -> Result<(), Refused> {
    let text = std::str::from_utf8(frame)
        .map_err(|_| Refused("handshake is not UTF-8 text".to_string()))?;
    let text = text.trim();
    let Some((protocol, rest)) = text.split_once('/') else {
        return Err(Refused(format!(
            "expected {HANDSHAKE}, got {}",
            shown(text)
        )));
    };
    let Some((version, codec)) = rest.split_once(';') else {
        return Err(Refused(format!(
            "expected {HANDSHAKE}, got {}",
            shown(text)
        )));
    };
    if protocol != PROTOCOL {
        return Err(Refused(format!(
            "unsupported protocol {}: this gateway speaks {PROTOCOL}",
            shown(protocol)
        )));
    }
    if version != VERSION {
        return Err(Refused(format!(
            "unsupported version {}: this gateway speaks {VERSION}",
            shown(version)
        )));
    }
    if codec != CODEC {
        return Err(Refused(format!(
            "unsupported codec {}: this gateway speaks {CODEC}",
            shown(codec)
        )));
    }
    Ok(())
}

/// The refusal frame for `reason`.
pub fn refusal(reason: &str) -> String {
    format!("-ERR {reason}")
}

/// Whether an answer to our handshake accepts it (anything not starting with `+` refuses).
pub fn is_accepted(answer: &str) -> bool {
    answer.starts_with('+')
}

/// Quotes peer text for an error message, cut short so a huge frame does not make a huge reply.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(64).collect();
    if cut.len() < text.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_handshake() {
        assert_eq!(check(HANDSHAKE.as_bytes()), Ok(()));
        assert_eq!(check(b"SIMPLEX/1.0;json\n"), Ok(()));
    }

    #[test]
    fn refuses_other_protocols_versions_and_codecs() {
        let cases = [
            ("DUPLEX/1.0;json", "protocol"),
            ("SIMPLEX/2.0;json", "version"),
            ("SIMPLEX/1.0;msgpack", "codec"),
            ("SIMPLEX/1.0", "expected"),
            ("SIMPLEX", "expected"),
            ("", "expected"),
            ("{\"type\":\"req\"}", "expected"),
        ];
        for (frame, word) in cases {
            let reason = check(frame.as_bytes()).expect_err(frame).0;
            assert!(reason.contains(word), "{frame}: {reason}");
        }
        assert!(check(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn long_junk_is_cut_in_the_reason() {
        let junk = "x".repeat(10_000);
        let reason = check(junk.as_bytes()).expect_err("junk").0;
        assert!(reason.len() < 200, "{}", reason.len());
    }

    #[test]
    fn answers() {
        assert!(is_accepted("+OK"));
        assert!(is_accepted("+"));
        assert!(!is_accepted("-ERR no"));
        assert!(!is_accepted("OK"));
        assert!(refusal("bad").starts_with("-ERR"));
    }
}
