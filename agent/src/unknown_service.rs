//! Requests for a ttrpc service the agent does not serve.
//!
//! ttrpc-rust's router answers a request whose service it does not know with
//! INVALID_ARGUMENT ("service does not exist"), where Go's ttrpc and the
//! Kata API say UNIMPLEMENTED; a runtime probing for a newer service must be
//! able to tell "not here" from "you sent garbage". The library's service
//! table is an exact-name map with no fallback, so the fix sits in front of
//! it: [`Redirect`] wraps the read side of every accepted connection and
//! turns a request frame naming a service outside the served set into a
//! call to [`SERVICE`], whose one method answers UNIMPLEMENTED naming the
//! method that was asked for. Every other byte passes through unchanged, so
//! the library still frames, limits and answers everything else itself.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use futures_util::StreamExt;
use kestrel_protocols::protobuf::Message;
use kestrel_protocols::ttrpc::proto::{
    MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST,
};
use kestrel_protocols::ttrpc::r#async::transport::Listener;
use kestrel_protocols::ttrpc::r#async::{MethodHandler, Service, TtrpcContext};
use kestrel_protocols::ttrpc::{self, get_status, Code, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The service redirected requests go to. Not a Kata name: it only exists
/// on the far side of [`Redirect`].
pub const SERVICE: &str = "kestrel.UnknownService";
const METHOD: &str = "Answer";

/// The service that answers redirected requests, for `Server::register_service`.
pub fn service() -> HashMap<String, Service> {
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    methods.insert(METHOD.to_string(), Box::new(Unimplemented));
    let service = Service {
        methods,
        streams: HashMap::new(),
    };
    HashMap::from([(SERVICE.to_string(), service)])
}

/// `inner`'s connections, each wrapped in a [`Redirect`] for the services
/// named in `served`.
pub fn listener(inner: Listener, served: HashSet<String>) -> Listener {
    let served = Arc::new(served);
    Listener::new(inner.map(move |socket| socket.map(|s| Redirect::new(s, Arc::clone(&served)))))
}

struct Unimplemented;

#[async_trait]
impl MethodHandler for Unimplemented {
    async fn handler(&self, _: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        // A redirected request carries the method path it asked for as its
        // payload (see `redirect`); anything else came here by name.
        let asked = String::from_utf8_lossy(&req.payload);
        let asked = if asked.is_empty() {
            format!("{}/{}", req.service, req.method)
        } else {
            asked.into_owned()
        };
        tracing::debug!(method = %asked, "request for a service the agent does not serve");
        let mut resp = Response::new();
        resp.status = Some(get_status(
            Code::UNIMPLEMENTED,
            format!("{asked}: the Kestrel agent does not serve this service"),
        ))
        .into();
        Ok(resp)
    }
}

/// Where [`Redirect`] is in the byte stream of frames.
enum State {
    /// Collecting a frame header (length u32 BE, stream id u32 BE, type, flags).
    Header {
        buf: [u8; MESSAGE_HEADER_LENGTH],
        filled: usize,
    },
    /// Collecting a request's body to read the service it names.
    Request {
        header: [u8; MESSAGE_HEADER_LENGTH],
        body: Vec<u8>,
        filled: usize,
    },
    /// Handing `bytes[pos..]` to the reader, then `then` bytes of the
    /// frame's body straight from the socket.
    Emit {
        bytes: Vec<u8>,
        pos: usize,
        then: usize,
    },
    /// Passing `left` bytes of a frame body straight through.
    Pass { left: usize },
}

impl State {
    fn header() -> Self {
        State::Header {
            buf: [0; MESSAGE_HEADER_LENGTH],
            filled: 0,
        }
    }
}

/// A connection whose request frames for unserved services are redirected
/// to [`SERVICE`]; writes go straight to the socket.
pub struct Redirect<S> {
    inner: S,
    served: Arc<HashSet<String>>,
    state: State,
}

impl<S> Redirect<S> {
    pub fn new(inner: S, served: Arc<HashSet<String>>) -> Self {
        Redirect {
            inner,
            served,
            state: State::header(),
        }
    }
}

/// The frame to hand on for a complete request: unchanged, unless it
/// decodes and names a service outside `served`. A body that does not
/// decode goes on as it is, for the library to refuse as it always has.
fn redirect(
    header: &[u8; MESSAGE_HEADER_LENGTH],
    body: Vec<u8>,
    served: &HashSet<String>,
) -> Vec<u8> {
    let unchanged = |body: Vec<u8>| [header.as_slice(), &body].concat();
    let Ok(req) = Request::parse_from_bytes(&body) else {
        return unchanged(body);
    };
    if served.contains(&req.service) {
        return unchanged(body);
    }
    let mut redirected = Request::new();
    redirected.service = SERVICE.to_string();
    redirected.method = METHOD.to_string();
    redirected.payload = format!("{}/{}", req.service, req.method).into_bytes();
    redirected.timeout_nano = req.timeout_nano;
    redirected.metadata = req.metadata;
    let Ok(new_body) = redirected.write_to_bytes() else {
        return unchanged(body);
    };
    let Ok(len) = u32::try_from(new_body.len()) else {
        return unchanged(body);
    };
    let mut frame = Vec::with_capacity(MESSAGE_HEADER_LENGTH + new_body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&header[4..]);
    frame.extend_from_slice(&new_body);
    frame
}

impl<S: AsyncRead + Unpin> AsyncRead for Redirect<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match &mut this.state {
                State::Header { buf, filled } => {
                    let mut rb = ReadBuf::new(&mut buf[*filled..]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        if *filled == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        // A truncated header goes on as it is: the library
                        // sees the same end of stream it would without us.
                        let bytes = buf[..*filled].to_vec();
                        this.state = State::Emit {
                            bytes,
                            pos: 0,
                            then: 0,
                        };
                        continue;
                    }
                    *filled += n;
                    if *filled < MESSAGE_HEADER_LENGTH {
                        continue;
                    }
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    let header = *buf;
                    // Oversized frames are the library's to refuse; it
                    // skips their bodies without buffering them, and so
                    // do we.
                    this.state = if header[8] == MESSAGE_TYPE_REQUEST && len <= MESSAGE_LENGTH_MAX {
                        State::Request {
                            header,
                            body: vec![0; len],
                            filled: 0,
                        }
                    } else {
                        State::Emit {
                            bytes: header.to_vec(),
                            pos: 0,
                            then: len,
                        }
                    };
                }
                State::Request {
                    header,
                    body,
                    filled,
                } => {
                    if *filled < body.len() {
                        let mut rb = ReadBuf::new(&mut body[*filled..]);
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        if n == 0 {
                            let bytes = [header.as_slice(), &body[..*filled]].concat();
                            this.state = State::Emit {
                                bytes,
                                pos: 0,
                                then: 0,
                            };
                        } else {
                            *filled += n;
                        }
                        continue;
                    }
                    let bytes = redirect(header, std::mem::take(body), &this.served);
                    this.state = State::Emit {
                        bytes,
                        pos: 0,
                        then: 0,
                    };
                }
                State::Emit { bytes, pos, then } => {
                    if *pos < bytes.len() {
                        let k = out.remaining().min(bytes.len() - *pos);
                        out.put_slice(&bytes[*pos..*pos + k]);
                        *pos += k;
                        return Poll::Ready(Ok(()));
                    }
                    this.state = if *then > 0 {
                        State::Pass { left: *then }
                    } else {
                        State::header()
                    };
                }
                State::Pass { left } => {
                    let dst = out.initialize_unfilled_to(out.remaining().min(*left));
                    let mut rb = ReadBuf::new(dst);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    out.advance(n);
                    *left -= n;
                    if *left == 0 {
                        this.state = State::header();
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Redirect<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(stream_id: u32, ty: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.extend_from_slice(&[ty, 0]);
        f.extend_from_slice(body);
        f
    }

    fn request(service: &str, method: &str, payload: &[u8]) -> Vec<u8> {
        let mut req = Request::new();
        req.service = service.to_string();
        req.method = method.to_string();
        req.payload = payload.to_vec();
        req.timeout_nano = 7;
        req.write_to_bytes().unwrap()
    }

    fn served() -> Arc<HashSet<String>> {
        Arc::new(HashSet::from(["grpc.AgentService".to_string()]))
    }

    /// Reads everything `input` turns into, in reads of at most `chunk` bytes.
    async fn read_all(input: Vec<u8>, chunk: usize) -> Vec<u8> {
        let mut r = Redirect::new(input.as_slice(), served());
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Splits a byte stream back into (stream id, type, body) frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            let id = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
            out.push((id, bytes[8], bytes[10..10 + len].to_vec()));
            bytes = &bytes[10 + len..];
        }
        out
    }

    #[tokio::test]
    async fn requests_for_served_services_and_other_frames_pass_unchanged() {
        let mut input = frame(
            1,
            MESSAGE_TYPE_REQUEST,
            &request("grpc.AgentService", "CopyFile", &[9; 5000]),
        );
        input.extend(frame(3, 3, b"stream data"));
        input.extend(frame(5, MESSAGE_TYPE_REQUEST, b"\xff\xff not protobuf"));
        for chunk in [1, 7, 64 * 1024] {
            assert_eq!(
                read_all(input.clone(), chunk).await,
                input,
                "reads of {chunk} bytes"
            );
        }
    }

    #[tokio::test]
    async fn a_request_for_an_unknown_service_goes_to_the_unimplemented_service() {
        let mut input = frame(
            1,
            MESSAGE_TYPE_REQUEST,
            &request("grpc.Nope", "Probe", b"payload"),
        );
        input.extend(frame(
            3,
            MESSAGE_TYPE_REQUEST,
            &request("grpc.AgentService", "ListRoutes", b""),
        ));
        for chunk in [1, 3, 4096] {
            let out = frames(&read_all(input.clone(), chunk).await);
            assert_eq!(out.len(), 2);
            let (id, ty, body) = &out[0];
            assert_eq!((*id, *ty), (1, MESSAGE_TYPE_REQUEST));
            let req = Request::parse_from_bytes(body).unwrap();
            assert_eq!(
                (req.service.as_str(), req.method.as_str()),
                (SERVICE, METHOD)
            );
            assert_eq!(req.payload, b"grpc.Nope/Probe");
            assert_eq!(req.timeout_nano, 7, "the caller's deadline still applies");
            let req = Request::parse_from_bytes(&out[1].2).unwrap();
            assert_eq!(
                req.service, "grpc.AgentService",
                "the next frame is untouched"
            );
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_reach_the_library_as_they_came() {
        let mut oversized = ((MESSAGE_LENGTH_MAX + 1) as u32).to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0, 0, 0, 1, MESSAGE_TYPE_REQUEST, 0]);
        oversized.extend_from_slice(&[0xaa; 100]);
        assert_eq!(read_all(oversized.clone(), 4096).await, oversized);

        let full = frame(1, MESSAGE_TYPE_REQUEST, &request("grpc.Nope", "Probe", b""));
        for cut in [3, MESSAGE_HEADER_LENGTH, full.len() - 1] {
            let truncated = full[..cut].to_vec();
            assert_eq!(
                read_all(truncated.clone(), 4096).await,
                truncated,
                "cut at {cut}"
            );
        }
    }
}
