//! A bound on the chunks of an aws-chunked upload (`STREAMING-*`).
//!
//! `s3s` decodes an aws-chunked body chunk by chunk, and holds each chunk
//! whole until its last byte has come (it must check the chunk's signature
//! before handing anything on). The size of a chunk is the client's to say,
//! up to 4 GiB in its 8 hex digits: one signed-in client could make the
//! gateway hold gigabytes per connection, outside the receive budget that
//! bounds what uploads hold (`receive_memory_mib`), which counts only what
//! `s3s` hands on. The clients send small chunks (botocore and aws-cli
//! 1 MiB, the Go and Java SDKs 64 and 128 KiB), so the framing is read as
//! the bytes pass towards `s3s`, and a chunk larger than [`MAX_CHUNK`] ends
//! the request with S3's 400 `InvalidRequest` before its data is buffered.
use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::s3_digest::{Refused, Verdict};

/// The largest chunk accepted: four times the largest any client sends.
pub const MAX_CHUNK: u64 = 4 << 20;

/// The longest chunk header line (`SIZE;chunk-signature=<64 hex>\r\n` is
/// under 100 bytes).
const MAX_LINE: usize = 1024;

/// Where the reader is in the framing.
#[derive(Debug)]
enum State {
    /// Reading a chunk's header line: its size so far, how many hex digits
    /// gave it, whether the digits have ended, and the line's length.
    Line {
        size: u64,
        digits: u32,
        ended: bool,
        len: usize,
    },
    /// Passing a chunk's data and the CRLF after it.
    Data { left: u64 },
    /// After the last (empty) chunk: trailers, which `s3s` bounds itself.
    Done,
}

/// The aws-chunked framing, read as bytes pass.
#[derive(Debug)]
pub struct Framing {
    state: State,
}

impl Default for Framing {
    fn default() -> Self {
        Framing { state: line() }
    }
}

fn line() -> State {
    State::Line {
        size: 0,
        digits: 0,
        ended: false,
        len: 0,
    }
}

impl Framing {
    /// Reads `buf`; an error says why the body is refused. Malformed framing
    /// other than a size too large is left to `s3s`, which refuses it.
    pub fn feed(&mut self, mut buf: &[u8]) -> Result<(), String> {
        while !buf.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { left } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    buf = &buf[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = line();
                    }
                }
                State::Line {
                    size,
                    digits,
                    ended,
                    len,
                } => {
                    let b = buf[0];
                    buf = &buf[1..];
                    *len += 1;
                    if *len > MAX_LINE {
                        return Err(format!(
                            "an aws-chunked chunk header longer than {MAX_LINE} bytes"
                        ));
                    }
                    if b == b'\n' {
                        self.state = match *size {
                            0 => State::Done,
                            // The data, then its CRLF.
                            n => State::Data { left: n + 2 },
                        };
                        continue;
                    }
                    match (*ended, (b as char).to_digit(16)) {
                        (false, Some(v)) => {
                            *digits += 1;
                            *size = size.saturating_mul(16).saturating_add(u64::from(v));
                            if *size > MAX_CHUNK || *digits > 16 {
                                return Err(format!(
                                    "an aws-chunked chunk larger than the {} MiB this \
                                     server accepts (clients send 1 MiB or less)",
                                    MAX_CHUNK >> 20
                                ));
                            }
                        }
                        _ => *ended = true,
                    }
                }
            }
        }
        Ok(())
    }
}

/// A request body whose aws-chunked framing is checked as it passes: a
/// chunk too large fails the body, leaving the reason in its [`Verdict`].
pub struct ChunkLimit<B> {
    inner: B,
    framing: Framing,
    verdict: Verdict,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ChunkRefused(String);

/// Wraps `req`'s body; the verdict to look at after the call.
pub fn wrap<B>(req: http::Request<B>) -> (http::Request<ChunkLimit<B>>, Verdict) {
    let verdict = Verdict::default();
    let req = req.map(|inner| ChunkLimit {
        inner,
        framing: Framing::default(),
        verdict: verdict.clone(),
    });
    (req, verdict)
}

impl<B> http_body::Body for ChunkLimit<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(why) = this.framing.feed(data) {
                        if let Ok(mut v) = this.verdict.lock() {
                            *v = Some(Refused {
                                code: "InvalidRequest",
                                status: http::StatusCode::BAD_REQUEST,
                                message: why.clone(),
                            });
                        }
                        return Poll::Ready(Some(Err(Box::new(ChunkRefused(why)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An aws-chunked body of `chunks`, signed-style, with a final empty
    /// chunk and a trailer.
    fn body(chunks: &[usize]) -> Vec<u8> {
        let sig = ";chunk-signature=".to_string() + &"0".repeat(64);
        let mut out = Vec::new();
        for &n in chunks {
            out.extend_from_slice(format!("{n:x}{sig}\r\n").as_bytes());
            out.extend(std::iter::repeat_n(b'a', n));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("0{sig}\r\n").as_bytes());
        out.extend_from_slice(b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n");
        out
    }

    fn feed_in(bytes: &[u8], piece: usize) -> Result<(), String> {
        let mut f = Framing::default();
        for p in bytes.chunks(piece.max(1)) {
            f.feed(p)?;
        }
        Ok(())
    }

    /// Chunks up to the limit pass however the bytes are split; the first
    /// chunk over it is refused from its header, whatever came before.
    #[test]
    fn chunks_over_the_limit_are_refused_from_their_header() {
        let max = MAX_CHUNK as usize;
        for piece in [1, 7, 4096, usize::MAX] {
            assert_eq!(feed_in(&body(&[1 << 20, 8192, 5]), piece), Ok(()));
            assert_eq!(feed_in(&body(&[max, max]), piece), Ok(()));
            // Only the header of the large chunk: refused before its data.
            let mut big = b"10000\r\n".to_vec();
            big.extend(std::iter::repeat_n(b'a', 65536));
            big.extend_from_slice(b"\r\n");
            big.extend_from_slice(format!("{:x}\r\n", max + 1).as_bytes());
            assert!(feed_in(&big, piece).is_err(), "piece {piece}");
            // Leading zeros do not hide a size, nor do many digits.
            assert!(feed_in(b"0000000000000000000000001\r\n", piece).is_err());
            assert!(feed_in(b"ffffffff;chunk-signature=00\r\n", piece).is_err());
        }
        // Digits in the signature are not the size.
        assert_eq!(feed_in(b"10;chunk-signature=ffffffffff\r\n", 3), Ok(()));
        // A header line without end is refused, not buffered.
        assert!(feed_in(&[b';'; MAX_LINE + 1], 64).is_err());
    }

    /// After the last chunk, whatever follows (the trailers) passes.
    #[test]
    fn trailers_pass() {
        let mut f = Framing::default();
        f.feed(b"0\r\n").unwrap();
        f.feed(&[b'z'; 10 * MAX_LINE]).unwrap();
    }
}
