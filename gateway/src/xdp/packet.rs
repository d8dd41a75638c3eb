//! Crafted Ethernet frames for BPF_PROG_TEST_RUN (tests and the bench).
//! Checksums are left zero: XDP never looks at them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&MAC_DST);
    f.extend_from_slice(&MAC_SRC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A TCP header (20 bytes) to `dport` with `flags`.
fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

fn udp(dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&40000u16.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&8u16.to_be_bytes());
    u
}

fn ipv4(src: Ipv4Addr, proto: u8, payload: &[u8], frag_offset: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    let total = (20 + payload.len()) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&(frag_offset & 0x1fff).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&Ipv4Addr::new(10, 199, 0, 1).octets());
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(
        &"fd00:199::1"
            .parse::<Ipv6Addr>()
            .unwrap_or(Ipv6Addr::LOCALHOST)
            .octets(),
    );
    h.extend_from_slice(payload);
    h
}

/// IPv4 TCP to `dport`.
pub fn tcp4(src: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend(ipv4(src, 6, &tcp(dport, flags), 0));
    f
}

/// IPv4 UDP to `dport`.
pub fn udp4(src: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend(ipv4(src, 17, &udp(dport), 0));
    f
}

/// A later IPv4 fragment (no transport header).
pub fn fragment4(src: Ipv4Addr) -> Vec<u8> {
    let mut f = eth(0x0800);
    f.extend(ipv4(src, 6, &[0u8; 16], 185));
    f
}

/// IPv6 TCP to `dport`.
pub fn tcp6(src: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = eth(0x86dd);
    f.extend(ipv6(src, 6, &tcp(dport, flags)));
    f
}

/// IPv6 TCP behind a hop-by-hop options header and a (first) fragment
/// header.
pub fn tcp6_ext(src: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut payload = vec![44u8, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop: next = fragment, PadN
    payload.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 7]); // fragment: next = TCP, offset 0, M=1
    payload.extend(tcp(dport, flags));
    let mut f = eth(0x86dd);
    f.extend(ipv6(src, 0, &payload));
    f
}

/// `frame` with an 802.1Q tag inserted after the MAC addresses.
pub fn vlan(frame: &[u8], id: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// An ARP request (not IP).
pub fn arp() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[0u8; 28]);
    f
}
