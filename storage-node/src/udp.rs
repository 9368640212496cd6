//! QUIC endpoints on UDP sockets with room for bursts.
//!
//! Linux gives a UDP socket a 208 KiB receive buffer unless asked for more. A
//! gateway reading shards from several nodes at once overflows it; every
//! datagram the kernel drops is a loss to QUIC's congestion control, which
//! backs off while the machine sits partly idle. Measured on a 2-core machine
//! (see BENCHMARKS.md): ~3 % of datagrams dropped during a repair, reads at
//! 51-64 % and repair at ~70 % of what they reach with 8 MiB of buffer.
//! quic-go asks for 7 MiB for the same reason.

use rustix::net::sockopt as so;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;

/// Receive and send buffer asked for on every QUIC socket.
pub const BUFFER_BYTES: usize = 8 << 20;

/// A QUIC endpoint bound to `addr`: a server when `server` is given (with
/// the endpoint configuration [`crate::tls::endpoint_config`] gives, whose
/// stateless-reset key outlives the process), else a client (set its default
/// client config before connecting). An IPv6 socket is dual-stack, as
/// `quinn::Endpoint::client` makes it, so it also reaches IPv4-mapped
/// addresses.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<(quinn::EndpointConfig, quinn::ServerConfig)>,
) -> std::io::Result<quinn::Endpoint> {
    let (config, server) = match server {
        Some((config, server)) => (config, Some(server)),
        None => (quinn::EndpointConfig::default(), None),
    };
    quinn::Endpoint::new(config, server, bind(addr)?, Arc::new(quinn::TokioRuntime))
}

/// A UDP socket bound to `addr` with [`size_buffers`]; dual-stack if IPv6.
fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    if addr.is_ipv6() {
        so::set_ipv6_v6only(&fd, false)?;
    }
    size_buffers(&fd);
    rustix::net::bind(&fd, &addr)?;
    Ok(UdpSocket::from(fd))
}

/// Asks for [`BUFFER_BYTES`] each way: up to `net.core.rmem_max` /
/// `wmem_max` unprivileged, beyond with `CAP_NET_ADMIN` (Linux). Returns
/// the receive and send buffers the kernel granted; warns (once per
/// process) when either is smaller than asked.
pub fn size_buffers(socket: impl AsFd) -> (usize, usize) {
    let socket = socket.as_fd();
    let _ = so::set_socket_recv_buffer_size(socket, BUFFER_BYTES);
    let _ = so::set_socket_send_buffer_size(socket, BUFFER_BYTES);
    #[cfg(target_os = "linux")]
    {
        if granted(so::socket_recv_buffer_size(socket)) < BUFFER_BYTES {
            let _ = so::set_socket_recv_buffer_size_force(socket, BUFFER_BYTES);
        }
        if granted(so::socket_send_buffer_size(socket)) < BUFFER_BYTES {
            let _ = so::set_socket_send_buffer_size_force(socket, BUFFER_BYTES);
        }
    }
    let recv = granted(so::socket_recv_buffer_size(socket));
    let send = granted(so::socket_send_buffer_size(socket));
    if recv < BUFFER_BYTES || send < BUFFER_BYTES {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                receive = recv,
                send,
                wanted = BUFFER_BYTES,
                "the kernel limits QUIC's UDP buffers; datagrams will be dropped under load: \
                 raise net.core.rmem_max and net.core.wmem_max to at least {BUFFER_BYTES}"
            );
        });
    }
    (recv, send)
}

/// The buffer size a set gave: Linux reports twice the size set (the other
/// half is its bookkeeping); other systems report it as set.
fn granted(reported: rustix::io::Result<usize>) -> usize {
    let reported = reported.unwrap_or(0);
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_never_get_less_than_the_default_and_report_what_they_got() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let default_recv = so::socket_recv_buffer_size(&socket).unwrap();
        let default_send = so::socket_send_buffer_size(&socket).unwrap();
        let (recv, send) = size_buffers(&socket);
        let (now_recv, now_send) = (
            so::socket_recv_buffer_size(&socket).unwrap(),
            so::socket_send_buffer_size(&socket).unwrap(),
        );
        assert!(now_recv >= default_recv && now_send >= default_send);
        assert_eq!((recv, send), (granted(Ok(now_recv)), granted(Ok(now_send))));
    }

    #[test]
    fn sockets_are_bound_with_their_buffers_and_ipv6_ones_are_dual_stack() {
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().port() != 0);
        // Skipped where the machine has no IPv6 at all.
        match bind("[::]:0".parse().unwrap()) {
            Ok(v6) => assert!(
                !so::ipv6_v6only(&v6).unwrap(),
                "IPv4-mapped peers unreachable"
            ),
            Err(e) => eprintln!("skipped the IPv6 half: {e}"),
        }
    }
}
