//! Frame access shared by the XDP and TC flavours of the uplink guard.

use aya_ebpf::programs::{TcContext, XdpContext};

/// A frame the uplink guard can judge: XDP's, or a socket buffer's at TC.
pub(crate) trait Frame {
    fn start(&self) -> usize;
    /// End of the directly readable bytes.
    fn end(&self) -> usize;
    /// The whole frame's length (a socket buffer's may lie partly outside the readable bytes).
    fn len(&self) -> usize;
    /// The size of each datagram when the frame is a run of them (a UDP GSO socket buffer).
    fn segment(&self) -> Option<usize>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn segment(&self) -> Option<usize> {
        None
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.skb.len() as usize
    }
    #[inline(always)]
    fn segment(&self) -> Option<usize> {
        // SAFETY: reads a field of the program's own __sk_buff.
        let gso = unsafe { (*self.skb.skb).gso_size };
        (gso > 0).then_some(gso as usize)
    }
}

/// Bounds-checked pointer into the readable part of a frame.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

pub(crate) const ETH_HDR: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
