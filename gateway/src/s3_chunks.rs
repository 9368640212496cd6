//! The memory the chunks of an aws-chunked upload (`STREAMING-*`) take.
//!
//! `s3s` decodes an aws-chunked body chunk by chunk, and holds each chunk
//! whole until its last byte has come (it must check a signed chunk's
//! signature before handing anything on, and does the same for unsigned
//! ones). The size of a chunk is the client's to say, up to 4 GiB in its 8
//! hex digits, outside the receive budget that bounds what uploads hold
//! (`receive_memory_mib`), which counts only what `s3s` hands on. Most
//! clients send small chunks (botocore and aws-cli 1 MiB, the Go and Java
//! SDKs 64 and 128 KiB when signing them), but some send a whole part or
//! object as one (the Go SDK's unsigned chunks, the CRT's 8 MiB parts). So
//! the framing is read as the bytes pass towards `s3s`, and a chunk over
//! [`FREE_CHUNK`] is charged to a budget of its own, as large as the
//! receive budget, from its header until the upload has taken it from
//! `s3s` whole (the next read of the body): one the budget cannot hold now
//! is refused with S3's 503 `SlowDown` (clients retry it), one larger than
//! the whole budget with 400 `EntityTooLarge` (send it in parts), before
//! its data is buffered. Its own budget, not the receive budget: an upload
//! holding a chunk's charge while it waits for receive memory for its
//! stripe must not wait on itself.
use bytes::Bytes;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::s3_digest::{Refused, Verdict};

/// Chunks up to this size (what botocore sends) are not charged: a few per
/// connection, and connections are capped.
pub const FREE_CHUNK: u64 = 1 << 20;

/// The chunks' budget: its semaphore (a permit per KiB) and its size in
/// KiB. Nothing waits on it (a charge is taken or refused at once), so a
/// release always reaches the next charge.
#[derive(Clone, Debug)]
pub struct Budget {
    pub memory: Arc<Semaphore>,
    pub kib: usize,
}

/// The longest chunk header line (`SIZE;chunk-signature=<64 hex>\r\n` is
/// under 100 bytes).
const MAX_LINE: usize = 1024;

/// Where the reader is in the framing.
#[derive(Debug)]
enum State {
    /// Reading a chunk's header line: its size so far, how many hex digits
    /// gave it, whether the size has ended (at `;` or CR), and the line's
    /// length.
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
    budget: Budget,
    /// What the chunk being passed holds of the budget.
    held: Option<OwnedSemaphorePermit>,
    /// What the chunks that have passed whole hold, until the upload has
    /// taken them from `s3s`: it hands them on now, and the next read of
    /// the body means they were taken (see [`Framing::taken`]). Apart from
    /// `held`: the next chunk's header, in the same read as the end of
    /// this one's data, must not release this one's charge.
    passed: Vec<OwnedSemaphorePermit>,
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
    pub fn new(budget: Budget) -> Self {
        Framing {
            state: line(),
            budget,
            held: None,
            passed: Vec::new(),
        }
    }

    /// The body is read again: a chunk that had passed whole has been
    /// taken from `s3s` by the upload, and its charge is released.
    pub fn taken(&mut self) {
        self.passed.clear();
    }

    /// A chunk of `size` bytes (`u64::MAX`: past 4 GiB) is more than the
    /// budget holds.
    fn too_large(&self, size: u64) -> Refused {
        let size = match size {
            u64::MAX => "more than 4 GiB".to_owned(),
            n => format!("{n} bytes"),
        };
        Refused {
            code: "EntityTooLarge",
            status: http::StatusCode::BAD_REQUEST,
            message: format!(
                "an aws-chunked chunk of {size} is more than this gateway holds for \
                 uploads ({} MiB); send the object in parts, or in smaller chunks",
                self.budget.kib >> 10
            ),
        }
    }

    /// Charges a chunk of `size` bytes, from its header.
    fn charge(&mut self, size: u64) -> Result<(), Refused> {
        if size <= FREE_CHUNK {
            return Ok(());
        }
        let kib = size.div_ceil(1024);
        let too_large = || self.too_large(size);
        if kib > self.budget.kib as u64 {
            return Err(too_large());
        }
        let kib = u32::try_from(kib).map_err(|_| too_large())?;
        let mut acquired = self.budget.memory.clone().try_acquire_many_owned(kib);
        if acquired.is_err() && !self.passed.is_empty() {
            // The chunk before, whole, is what holds the budget (this
            // header came in the same read as its end): given back now
            // rather than refuse a chunk the budget holds alone. Between
            // here and the next read its bytes go uncharged, briefly.
            self.passed.clear();
            acquired = self.budget.memory.clone().try_acquire_many_owned(kib);
        }
        match acquired {
            Ok(permit) => {
                self.held = Some(permit);
                Ok(())
            }
            Err(_) => Err(Refused {
                code: "SlowDown",
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                message: "the gateway's memory for receiving uploads is in use; retry shortly"
                    .into(),
            }),
        }
    }

    /// Reads `buf`; an error says why the body is refused: a size too
    /// large, or one `s3s` would read otherwise than here. It reads at most
    /// the first 8 hex digits of the size (ignoring any after them, and
    /// anything not hex up to `;` or CR): `000000010` would be 1 byte to
    /// it and 16 here, and the framing read here would then drift from the
    /// one it buffers, letting a 4 GiB chunk pass uncharged. So a size is
    /// 1 to 8 hex digits, ended by `;` or CR, or the body is refused.
    /// Other malformed framing is left to `s3s`, which refuses it.
    pub fn feed(&mut self, mut buf: &[u8]) -> Result<(), Refused> {
        while !buf.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { left } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    buf = &buf[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = line();
                        self.passed.extend(self.held.take());
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
                        return Err(Refused {
                            code: "InvalidRequest",
                            status: http::StatusCode::BAD_REQUEST,
                            message: format!(
                                "an aws-chunked chunk header longer than {MAX_LINE} bytes"
                            ),
                        });
                    }
                    let malformed = |why: &str| Refused {
                        code: "InvalidRequest",
                        status: http::StatusCode::BAD_REQUEST,
                        message: format!("an aws-chunked chunk size {why}"),
                    };
                    if !*ended {
                        match (b as char).to_digit(16) {
                            // Nine significant digits: past 4 GiB, too
                            // large rather than malformed (a client sending
                            // a huge part as one chunk). With leading zeros
                            // it is a size s3s would misread.
                            Some(_) if *digits == 8 && *size >= 1 << 28 => {
                                return Err(self.too_large(u64::MAX))
                            }
                            Some(_) if *digits == 8 => {
                                return Err(malformed("of more than 8 hex digits"))
                            }
                            Some(v) => {
                                *digits += 1;
                                *size = *size * 16 + u64::from(v);
                            }
                            None if (b == b';' || b == b'\r') && *digits > 0 => *ended = true,
                            None if *digits == 0 => return Err(malformed("is missing")),
                            None => {
                                return Err(malformed("must be hex digits ended by `;` or CRLF"))
                            }
                        }
                        continue;
                    }
                    if b == b'\n' {
                        let size = *size;
                        self.state = match size {
                            0 => State::Done,
                            // The data, then its CRLF.
                            n => State::Data {
                                left: n.saturating_add(2),
                            },
                        };
                        self.charge(size)?;
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

/// Wraps `req`'s body, its chunks charged to `budget`; the verdict to look
/// at after the call.
pub fn wrap<B>(req: http::Request<B>, budget: Budget) -> (http::Request<ChunkLimit<B>>, Verdict) {
    let verdict = Verdict::default();
    let req = req.map(|inner| ChunkLimit {
        inner,
        framing: Framing::new(budget),
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
        this.framing.taken();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(refused) = this.framing.feed(data) {
                        return Poll::Ready(Some(Err(crate::s3_digest::refuse(
                            &this.verdict,
                            refused,
                        ))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            // s3s takes a body that ends between chunks for a whole one.
            // With a Content-Length the upload's length check catches it;
            // sent chunked (`Transfer-Encoding`), only the missing final
            // chunk tells that the body was cut short, and the signed
            // chunks before it would be filed as the whole object.
            Poll::Ready(None) if !matches!(this.framing.state, State::Done) => {
                Poll::Ready(Some(Err(crate::s3_digest::refuse(
                    &this.verdict,
                    Refused {
                        code: "IncompleteBody",
                        status: http::StatusCode::BAD_REQUEST,
                        message: "the aws-chunked body ended before its final (empty) chunk".into(),
                    },
                ))))
            }
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

    const BUDGET_KIB: usize = 8 << 10;

    fn budget() -> Budget {
        Budget {
            memory: Arc::new(Semaphore::new(BUDGET_KIB)),
            kib: BUDGET_KIB,
        }
    }

    fn feed_in(b: &Budget, bytes: &[u8], piece: usize) -> Result<(), &'static str> {
        let mut f = Framing::new(b.clone());
        for p in bytes.chunks(piece.max(1)) {
            f.taken();
            f.feed(p).map_err(|r| r.code)?;
        }
        Ok(())
    }

    /// Chunks pass however the bytes are split, those over the free size
    /// charged to the budget only while they pass; one the budget cannot
    /// hold now is SlowDown, one larger than all of it EntityTooLarge, from
    /// its header, before its data.
    #[test]
    fn large_chunks_are_charged_to_the_receive_budget() {
        let mib = 1 << 20;
        for piece in [1, 7, 4096, usize::MAX] {
            let b = budget();
            assert_eq!(feed_in(&b, &body(&[mib, 8192, 5]), piece), Ok(()));
            // A whole 5 MiB part in one chunk, twice: each charged from its
            // header until it is taken, all given back at the end.
            assert_eq!(feed_in(&b, &body(&[5 * mib, 3 * mib]), piece), Ok(()));
            assert_eq!(b.memory.available_permits(), BUDGET_KIB);
            // Only the header of a chunk larger than the whole budget.
            let mut big = b"10000\r\n".to_vec();
            big.extend(std::iter::repeat_n(b'a', 65536));
            big.extend_from_slice(b"\r\n");
            big.extend_from_slice(format!("{:x}\r\n", (BUDGET_KIB << 10) + 1).as_bytes());
            assert_eq!(
                feed_in(&b, &big, piece),
                Err("EntityTooLarge"),
                "piece {piece}"
            );
            assert_eq!(
                feed_in(&b, b"ffffffff;chunk-signature=00\r\n", piece),
                Err("EntityTooLarge")
            );
            // A size s3s would read otherwise: past 8 digits it reads only
            // the first 8 (`000000010` is 1 byte to it), and it ignores
            // what is not hex before `;` or CR. Were 16 bytes read here,
            // its 4 GiB chunk after would pass uncharged as data.
            let mut drift = b"000000010\r\nA\r\nffffffff\r\n".to_vec();
            // (Read here as 16 bytes, the 8 of data end on the last
            // chunk's header, after which all passes.)
            drift.extend_from_slice(b"xxxxx0\r\n");
            drift.extend(std::iter::repeat_n(b'a', 4096));
            // Nine digits naming more than 4 GiB: too large (send parts).
            assert_eq!(feed_in(&b, b"100000000\r\n", piece), Err("EntityTooLarge"));
            for bad in [
                &drift[..],
                b"0000000000000000000000001\r\n",
                b"10zz;chunk-signature=00\r\n",
                b"10 \r\n",
                b"10\n",
                b";chunk-signature=00\r\n",
                b"\r\n",
            ] {
                assert_eq!(feed_in(&b, bad, piece), Err("InvalidRequest"), "{bad:?}");
            }
            // Eight digits, leading zeros or not, are the size.
            let mut eight = b"00000010\r\n".to_vec();
            eight.extend(std::iter::repeat_n(b'a', 16));
            eight.extend_from_slice(b"\r\n0\r\n");
            assert_eq!(feed_in(&b, &eight, piece), Ok(()));
            // Held by others: refused for now.
            let others = b.memory.clone().try_acquire_many_owned(6 << 10).unwrap();
            assert_eq!(
                feed_in(&b, format!("{:x}\r\n", 4 * mib).as_bytes(), piece),
                Err("SlowDown")
            );
            drop(others);
            assert_eq!(b.memory.available_permits(), BUDGET_KIB);
        }
        // A chunk that has passed is held until the body is read again
        // (the upload took it from s3s).
        let b = budget();
        let mut f = Framing::new(b.clone());
        let mut whole = format!("{:x}\r\n", 2 * mib).into_bytes();
        whole.extend(std::iter::repeat_n(b'a', 2 * mib));
        whole.extend_from_slice(b"\r\n");
        f.feed(&whole).unwrap();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (2 << 10));
        f.taken();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB);
        // The next chunk's header in the same read as the end of one's data:
        // both are held until the body is read again, then only the next.
        let mut two = whole.clone();
        two.extend(format!("{:x}\r\n", 3 * mib).into_bytes());
        f.feed(&two).unwrap();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (5 << 10));
        f.taken();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (3 << 10));
        f.feed(&vec![b'a'; 3 * mib]).unwrap();
        f.feed(b"\r\n").unwrap();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (3 << 10));
        f.taken();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB);
        // Two chunks the budget holds one at a time, the second's header in
        // the same read as the first's end: the first is given back rather
        // than the second refused.
        let mut big = format!("{:x}\r\n", 5 * mib).into_bytes();
        big.extend(std::iter::repeat_n(b'a', 5 * mib));
        big.extend(format!("\r\n{:x}\r\n", 5 * mib).into_bytes());
        assert_eq!(f.feed(&big).map_err(|r| r.code), Ok(()));
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (5 << 10));
        drop(f);
        assert_eq!(b.memory.available_permits(), BUDGET_KIB);
        // A chunk cut off still gives back what it held, with its framing.
        let mut f = Framing::new(b.clone());
        f.feed(format!("{:x}\r\n", 4 * mib).as_bytes()).unwrap();
        assert_eq!(b.memory.available_permits(), BUDGET_KIB - (4 << 10));
        drop(f);
        assert_eq!(b.memory.available_permits(), BUDGET_KIB);
        // Digits in the signature are not the size.
        assert_eq!(feed_in(&b, b"10;chunk-signature=ffffffffff\r\n", 3), Ok(()));
        // A header line without end is refused, not buffered.
        assert_eq!(
            feed_in(&b, &[b';'; MAX_LINE + 1], 64),
            Err("InvalidRequest")
        );
    }

    /// A body that ends before its final empty chunk fails, saying so;
    /// one that has it ends.
    #[test]
    fn a_body_cut_short_between_chunks_fails() {
        use http_body_util::BodyExt;
        let collect = |bytes: Vec<u8>| {
            let (req, verdict) = wrap(
                http::Request::new(http_body_util::Full::new(Bytes::from(bytes))),
                budget(),
            );
            let got = futures::executor::block_on(req.into_body().collect());
            let code = verdict.lock().unwrap().take().map(|r| r.code);
            (
                got.map(|c| c.to_bytes().len()).map_err(|e| e.to_string()),
                code,
            )
        };
        let whole = body(&[10, 20]);
        assert_eq!(collect(whole.clone()), (Ok(whole.len()), None));
        // Cut after the second chunk's data: every byte so far framed well.
        let tail = format!("0;chunk-signature={}\r\n", "0".repeat(64)).len()
            + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n".len();
        let cut = whole.len() - tail;
        assert!(whole[..cut].ends_with(b"a\r\n"));
        let (got, code) = collect(whole[..cut].to_vec());
        assert!(got.is_err());
        assert_eq!(code, Some("IncompleteBody"));
    }

    /// After the last chunk, whatever follows (the trailers) passes.
    #[test]
    fn trailers_pass() {
        let mut f = Framing::new(budget());
        f.feed(b"0\r\n").unwrap();
        f.feed(&[b'z'; 10 * MAX_LINE]).unwrap();
    }
}
