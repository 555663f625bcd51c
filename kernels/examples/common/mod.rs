//! What the kernel examples share.

use autodeploy_kernels::quant::BlockKind;

/// `blocks` blocks of `kind` with random bytes (xorshift) and a small f16 scale (0x2000) at
/// the start of each block, so sums stay finite.
pub fn random_blocks(kind: BlockKind, blocks: usize) -> Vec<u8> {
    let mut s = 12345u32;
    let mut w: Vec<u8> = (0..blocks * kind.bytes())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as u8
        })
        .collect();
    for b in w.chunks_mut(kind.bytes()) {
        b[..2].copy_from_slice(&0x2000u16.to_le_bytes());
    }
    w
}
