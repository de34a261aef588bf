//! Framing over in-memory buffers: tungstenite reads frames from what the socket brought in
//! (through the [`Gate`], which hands it whole frames only) and writes into a buffer the
//! connection flushes.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, ReadBuf};

/// What tungstenite's (blocking-style) framing reads from and writes to. Reads come from the
/// socket through the [`Gate`] when a task context is given (`WouldBlock` when it has nothing,
/// with the task registered for wake-up). Writes only ever append to `output`;
/// [`WsStream::flush`] sends it.
pub(super) struct Io<'a, 'c> {
    pub(super) socket: Option<(&'a mut Stream, &'a mut Context<'c>, &'a mut Gate, usize)>,
    pub(super) output: &'a mut Vec<u8>,
}

impl<'a> Io<'a, 'static> {
    /// For writing only: frames go to `output`, nothing is read.
    pub(super) fn writer(output: &'a mut Vec<u8>) -> Self {
        Io {
            socket: None,
            output,
        }
    }
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some((stream, cx, gate, max_frame)) = self.socket.as_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        gate.read(stream, cx, buf, *max_frame)
    }
}

/// Holds a frame back from the framing until all of it has come in.
///
/// tungstenite reserves room for a frame's whole announced length as soon as it reads the
/// frame's header: a peer that sends 10 bytes announcing a 1 MiB frame (and nothing more) would
/// make the gateway set aside 1 MiB. The gate reads the socket into a buffer of its own, which
/// grows only with the bytes that actually came, and hands the framing whole frames only (a
/// header announcing more than the limit goes through at once, for the framing to refuse).
#[derive(Default)]
pub(super) struct Gate {
    /// Bytes read from the socket; those before `taken` were handed over.
    held: Vec<u8>,
    /// How many of `held` were handed over.
    taken: usize,
    /// Where the whole frames end in `held` (all before it may be handed over).
    ready: usize,
    /// The socket has ended: everything held goes, then the end.
    ended: bool,
}

/// Bytes kept in an empty gate's buffer between reads (beyond it, the buffer is given back).
pub(super) const GATE_KEEP: usize = 4096;

impl Gate {
    pub(super) fn read(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        max_frame: usize,
    ) -> io::Result<usize> {
        loop {
            if self.ready > self.taken {
                let n = (self.ready - self.taken).min(buf.len());
                buf[..n].copy_from_slice(&self.held[self.taken..self.taken + n]);
                self.taken += n;
                if self.taken == self.held.len() {
                    // All handed over: start again at the front.
                    self.held.clear();
                    self.taken = 0;
                    self.ready = 0;
                    if self.held.capacity() > GATE_KEEP {
                        self.held = Vec::new();
                    }
                }
                return Ok(n);
            }
            if self.ended {
                if self.taken == self.held.len() {
                    return Ok(0);
                }
                self.ready = self.held.len();
                continue;
            }
            if self.taken > 0 {
                // What was handed over goes; the incomplete frame moves to the front.
                self.held.drain(..self.taken);
                self.ready -= self.taken;
                self.taken = 0;
            }
            // Read straight into the buffer's spare room (nothing zeroed first): as much as
            // the framing asked for, within bounds.
            let want = buf.len().clamp(512, 16 << 10);
            self.held.reserve(want);
            let start = self.held.len();
            let spare = &mut self.held.spare_capacity_mut()[..want];
            let mut read = ReadBuf::uninit(spare);
            let polled = Pin::new(&mut *stream).poll_read(cx, &mut read);
            let got = read.filled().len();
            // SAFETY: `ReadBuf` guarantees its first `got` bytes, in the spare room right after
            // the buffer's length, were written.
            unsafe { self.held.set_len(start + got) };
            match polled {
                Poll::Ready(Ok(())) if got == 0 => self.ended = true,
                Poll::Ready(Ok(())) => self.scan(max_frame),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    if self.held.is_empty() {
                        // Idle: an idle connection holds no buffer of the gate's.
                        self.held = Vec::new();
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
    }

    /// Marks the whole frames that follow the ready ones as ready.
    pub(super) fn scan(&mut self, max_frame: usize) {
        while let Some((header, payload)) = frame_extent(&self.held[self.ready..]) {
            if payload > max_frame as u64 {
                // The framing refuses it from its header alone.
                self.ready = self.held.len().min(self.ready + header);
                return;
            }
            let whole = header + payload as usize;
            if self.held.len() - self.ready < whole {
                return;
            }
            self.ready += whole;
        }
    }
}

/// The header length and the announced payload length of the frame `bytes` starts with, once
/// enough of its header has come to tell.
pub(super) fn frame_extent(bytes: &[u8]) -> Option<(usize, u64)> {
    let second = *bytes.get(1)?;
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (extra, len) = match second & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(raw))
        }
        n => (0, u64::from(n)),
    };
    Some((2 + extra + mask, len))
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::frame_extent;

    #[test]
    fn a_frame_header_tells_its_length_once_enough_of_it_has_come() {
        assert_eq!(frame_extent(&[0x81]), None);
        assert_eq!(frame_extent(&[0x81, 0x85]), Some((6, 5)), "masked, 5 bytes");
        assert_eq!(frame_extent(&[0x81, 5]), Some((2, 5)), "unmasked");
        assert_eq!(frame_extent(&[0x81, 0x80 | 126, 1]), None);
        assert_eq!(frame_extent(&[0x81, 0x80 | 126, 1, 0]), Some((8, 256)));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&(1u64 << 20).to_be_bytes());
        assert_eq!(frame_extent(&long[..9]), None);
        assert_eq!(frame_extent(&long), Some((10, 1 << 20)));
    }
}
