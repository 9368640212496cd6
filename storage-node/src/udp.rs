//! QUIC endpoints on UDP sockets with room for bursts.
//!
//! Linux gives a UDP socket a 208 KiB receive buffer unless asked for more. A
//! gateway reading shards from several nodes at once overflows it; every
//! datagram the kernel drops is a loss to QUIC's congestion control, which
//! backs off while the machine sits partly idle. Measured on a 2-core machine
//! (see BENCHMARKS.md): ~3 % of datagrams dropped during a repair, and reads
//! and repair at 60-75 % of what they reach with a few MiB of buffer. quic-go
//! asks for 7 MiB for the same reason.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// Receive and send buffer asked for on every QUIC socket.
pub const BUFFER_BYTES: usize = 8 << 20;

/// A QUIC endpoint bound to `addr`: a server when `server` is given, else a
/// client (set its default client config before connecting).
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = UdpSocket::bind(addr)?;
    size_buffers(&socket);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Asks for [`BUFFER_BYTES`] each way: up to `net.core.rmem_max` /
/// `wmem_max` unprivileged, beyond with `CAP_NET_ADMIN`. Returns the
/// receive buffer the kernel granted; warns (once per process) when it is
/// smaller than asked.
pub fn size_buffers(socket: &UdpSocket) -> usize {
    use rustix::net::sockopt as so;
    let want = BUFFER_BYTES;
    let _ = so::set_socket_recv_buffer_size(socket, want);
    if granted(so::socket_recv_buffer_size(socket)) < want {
        let _ = so::set_socket_recv_buffer_size_force(socket, want);
    }
    let _ = so::set_socket_send_buffer_size(socket, want);
    if granted(so::socket_send_buffer_size(socket)) < want {
        let _ = so::set_socket_send_buffer_size_force(socket, want);
    }
    let recv = granted(so::socket_recv_buffer_size(socket));
    if recv < want {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                granted = recv,
                wanted = want,
                "the kernel limits QUIC's UDP receive buffer; datagrams will be dropped under load: \
                 raise net.core.rmem_max and net.core.wmem_max to at least {want}"
            );
        });
    }
    recv
}

/// Linux reports twice the size set (the other half is its bookkeeping).
fn granted(reported: rustix::io::Result<usize>) -> usize {
    reported.map(|b| b / 2).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_at_least_the_default_buffer_and_report_what_they_got() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = granted(rustix::net::sockopt::socket_recv_buffer_size(&socket));
        let got = size_buffers(&socket);
        assert!(got >= before, "asked for more, got less: {got} < {before}");
        assert_eq!(
            got,
            granted(rustix::net::sockopt::socket_recv_buffer_size(&socket))
        );
    }
}
