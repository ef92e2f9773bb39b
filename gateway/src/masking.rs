//! RFC 6455 §5.1: "The server MUST close the connection upon receiving a
//! frame that is not masked." fastwebsockets unmasks a masked client frame
//! and takes an unmasked one as it is, without saying which it got, so the
//! gateway follows the frame headers in the bytes the client sends and
//! stops the stream at the first frame whose mask bit is clear (the
//! connection is then closed with 1002, see `connection.rs`).
//!
//! [`MaskCheck`] only reads headers: 2 bytes, the extended length (0, 2 or
//! 8 bytes) and the 4-byte masking key, then skips the payload. It never
//! buffers a payload and cannot panic on any input (property-tested below).

/// The client sent a frame without a mask.
#[derive(Debug, thiserror::Error)]
#[error("client frame without a mask (RFC 6455 section 5.1)")]
pub struct Unmasked;

/// Follows the frame headers of a client's byte stream.
#[derive(Debug, Default)]
pub struct MaskCheck {
    /// The header bytes of the frame being read (at most 2 + 8 + 4).
    header: [u8; 14],
    /// How many of them arrived.
    have: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: u64,
    /// Set at the first unmasked frame, which is reported once; later bytes
    /// pass unchecked, so the lingering close can drain what the client
    /// still sends (closing a socket with unread bytes resets it, and the
    /// client would miss our close frame).
    failed: bool,
}

impl MaskCheck {
    /// Feeds the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Unmasked> {
        if self.failed {
            return Ok(());
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 {
                continue;
            }
            if self.header[1] & 0x80 == 0 {
                self.failed = true;
                return Err(Unmasked);
            }
            let extended = match self.header[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            if self.have < 2 + extended + 4 {
                continue;
            }
            self.payload_left = match extended {
                0 => u64::from(self.header[1] & 0x7f),
                2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                _ => {
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&self.header[2..10]);
                    u64::from_be_bytes(len)
                }
            };
            self.have = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame: FIN + text opcode, the length in its shortest form,
    /// a mask key when `masked`, then the payload.
    fn frame(payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![0x81];
        let bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(bit | n as u8),
            n if n < 65536 => {
                out.push(bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn masked_frames_of_every_length_form_pass() {
        let mut check = MaskCheck::default();
        for n in [0, 1, 125, 126, 1000, 65535, 65536, 70_000] {
            check.feed(&frame(&vec![b'x'; n], true)).unwrap();
        }
    }

    #[test]
    fn an_unmasked_frame_is_reported_once() {
        let mut check = MaskCheck::default();
        check.feed(&frame(b"{\"type\":\"ping\"}", true)).unwrap();
        assert!(check.feed(&frame(b"{\"type\":\"ping\"}", false)).is_err());
        // The reader stopped at the error; what follows is only drained.
        assert!(check.feed(&frame(b"x", false)).is_ok());
    }

    proptest! {
        /// Any split of a stream of masked frames passes; the same stream
        /// with one frame unmasked fails at that frame, however the bytes
        /// arrive.
        #[test]
        fn splits_do_not_matter(
            lens in proptest::collection::vec(0usize..300, 1..8),
            unmasked in proptest::option::of(0usize..8),
            cuts in proptest::collection::vec(1usize..64, 1..64),
        ) {
            let mut stream = Vec::new();
            let mut bad_at = None;
            for (i, n) in lens.iter().enumerate() {
                let masked = unmasked != Some(i);
                if !masked {
                    bad_at = Some(stream.len());
                }
                stream.extend(frame(&vec![0xAB; *n], masked));
            }
            let mut check = MaskCheck::default();
            let mut at = 0;
            let mut failed_at = None;
            let mut cut = cuts.iter().cycle();
            while at < stream.len() {
                let end = (at + cut.next().unwrap()).min(stream.len());
                if check.feed(&stream[at..end]).is_err() {
                    failed_at = Some((at, end));
                    break;
                }
                at = end;
            }
            match (bad_at, failed_at) {
                (None, None) => {}
                // The second header byte of the bad frame was in the chunk.
                (Some(b), Some((from, to))) => prop_assert!(from <= b + 1 && b + 1 < to),
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = MaskCheck::default().feed(&bytes);
        }
    }
}
