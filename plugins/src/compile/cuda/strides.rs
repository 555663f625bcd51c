//! Where an attention operand's head rows lie in a strided view, and dim indices. The strides
//! of views themselves (contiguity, a view of a strided tensor, broadcasts) are the view ops'
//! own: `autodeploy_core::ops::layout`.

use autodeploy_kernels::cuda::exec::HeadRows;

pub(super) use autodeploy_core::ops::layout::{contiguous_strides, is_contiguous};

/// Where the head rows of an attention operand `[.., heads, tokens, d]` (leading dims 1) lie,
/// given its strides (None: contiguous); None when its rows are not contiguous.
pub(super) fn head_rows(shape: &[usize], strides: Option<&[i64]>) -> Option<HeadRows> {
    let r = shape.len();
    if r < 3 || shape[..r - 3].iter().any(|&n| n != 1) {
        return None;
    }
    match strides {
        None => Some(HeadRows::heads_major(shape[r - 2], shape[r - 1])),
        Some(st) if st[r - 1] == 1 || shape[r - 1] == 1 => Some(HeadRows { head: st[r - 3], token: st[r - 2] }),
        Some(_) => None,
    }
}

pub(super) fn norm_dim(d: i64, rank: usize) -> usize {
    if d < 0 {
        (d + rank as i64) as usize
    } else {
        d as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autodeploy_core::ops::layout::view_strides;

    #[test]
    fn attention_operands_read_their_head_rows_through_views() {
        // q's columns of a fused [1, 5, 96] q/k/v output, viewed as heads of 16, then
        // [1, h, seq, d] by transposing 1 and 2: head stride 16, token stride 96.
        let mut t = view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 5, 4, 16]).unwrap();
        t.swap(1, 2);
        assert_eq!(head_rows(&[1, 4, 5, 16], Some(&t)), Some(HeadRows { head: 16, token: 96 }));
        assert_eq!(head_rows(&[1, 4, 5, 16], None), Some(HeadRows::heads_major(5, 16)));
        // Attention out written [seq, h, d], seen as [1, h, seq, d], transposed back: contiguous.
        let o = HeadRows::tokens_major(4, 16);
        let mut st = vec![(4 * 5 * 16) as i64, o.head, o.token, 1];
        st.swap(1, 2);
        assert!(is_contiguous(&[1, 5, 4, 16], &st));
        // Rows with a stride between elements are no attention operand.
        assert_eq!(head_rows(&[1, 4, 5, 16], Some(&[0, 16, 96, 2])), None);
    }
}
