//! Strides of the executor's views: which views are contiguous, what strides a view of a
//! strided tensor has (as `torch.Tensor.view`), broadcasts, and where an attention operand's
//! head rows lie.

use autodeploy_kernels::cuda::exec::HeadRows;

pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as i64;
    }
    s
}

/// Whether a view with these sizes and strides is the contiguous layout of its shape.
pub(super) fn is_contiguous(shape: &[usize], strides: &[i64]) -> bool {
    let mut want = 1i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != want {
            return false;
        }
        want *= n as i64;
    }
    true
}

/// Strides of `new` viewing memory laid out as `old` with strides `old_st`, if a view can (as
/// `torch.Tensor.view`): each run of `old` dims that are contiguous among themselves splits or
/// merges into `new` dims of the same count; None when a `new` dim would straddle two runs.
pub(super) fn view_strides(old: &[usize], old_st: &[i64], new: &[usize]) -> Option<Vec<i64>> {
    if old.iter().product::<usize>() != new.iter().product::<usize>() {
        return None;
    }
    if old.is_empty() {
        return Some(contiguous_strides(new));
    }
    let mut st = vec![0i64; new.len()];
    let mut view_d = new.len() as isize - 1;
    let mut base = old_st[old.len() - 1];
    let (mut tensor_n, mut view_n) = (1usize, 1usize);
    for d in (0..old.len()).rev() {
        tensor_n *= old[d];
        // A run ends where the next dim out is not laid out right after this run.
        if d == 0 || (old[d - 1] != 1 && old_st[d - 1] != tensor_n as i64 * base) {
            while view_d >= 0 && (view_n < tensor_n || new[view_d as usize] == 1) {
                st[view_d as usize] = view_n as i64 * base;
                view_n *= new[view_d as usize];
                view_d -= 1;
            }
            if view_n != tensor_n {
                return None;
            }
            if d > 0 {
                base = old_st[d - 1];
                tensor_n = 1;
                view_n = 1;
            }
        }
    }
    (view_d == -1).then_some(st)
}

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

pub(super) use autodeploy_kernels::cuda::exec::broadcast_strides;

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

    #[test]
    fn views_are_contiguous_only_when_their_strides_say_so() {
        // [1, seq, h, d] -> [1, h, seq, d]: a copy unless seq or h is 1.
        let st = |s: &[usize], a: usize, b: usize| {
            let mut v = contiguous_strides(s);
            v.swap(a, b);
            v
        };
        assert!(is_contiguous(&[1, 4, 1, 16], &st(&[1, 1, 4, 16], 1, 2)));
        assert!(!is_contiguous(&[1, 4, 3, 16], &st(&[1, 3, 4, 16], 1, 2)));
        // A slice of the last dim of [1, 1, 96] is contiguous; of [1, 2, 96] it is not.
        assert!(is_contiguous(&[1, 1, 32], &contiguous_strides(&[1, 1, 96])));
        assert!(!is_contiguous(&[1, 2, 32], &contiguous_strides(&[1, 2, 96])));
        assert_eq!(broadcast_strides(&[1, 16], &[1, 4, 3, 16]), vec![0, 0, 0, 1]);
    }

    #[test]
    fn views_of_strided_tensors_split_and_merge_runs_of_dims() {
        // q's columns of a fused [1, 5, 96] q/k/v output: [1, 5, 64] with strides [480, 96, 1],
        // viewed as heads of 16.
        let q = view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 5, 4, 16]).unwrap();
        assert_eq!(q, vec![480, 96, 16, 1]);
        // Then [1, h, seq, d] by transposing 1 and 2: head stride 16, token stride 96.
        let mut t = q.clone();
        t.swap(1, 2);
        assert_eq!(head_rows(&[1, 4, 5, 16], Some(&t)), Some(HeadRows { head: 16, token: 96 }));
        assert_eq!(head_rows(&[1, 4, 5, 16], None), Some(HeadRows::heads_major(5, 16)));
        // Attention out written [seq, h, d], seen as [1, h, seq, d], transposed back: contiguous.
        let o = HeadRows::tokens_major(4, 16);
        let mut st = vec![(4 * 5 * 16) as i64, o.head, o.token, 1];
        st.swap(1, 2);
        assert!(is_contiguous(&[1, 5, 4, 16], &st));
        // Contiguous tensors view as anything of their size; merging dims of different runs
        // (the sliced columns with the rows) cannot.
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]), Some(vec![4, 1]));
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[24]), Some(vec![1]));
        assert_eq!(view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 320]), None);
        assert_eq!(view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 5, 64]), Some(vec![480, 96, 1]));
        // A transposed tensor merges only the dims still laid out together.
        assert_eq!(view_strides(&[4, 5, 16], &[16, 64, 1], &[4, 5, 4, 4]), Some(vec![16, 64, 4, 1]));
        assert_eq!(view_strides(&[4, 5, 16], &[16, 64, 1], &[20, 16]), None);
        assert_eq!(view_strides(&[2, 3], &[3, 1], &[7]), None);
        // Rows with a stride between elements are no attention operand.
        assert_eq!(head_rows(&[1, 4, 5, 16], Some(&[0, 16, 96, 2])), None);
    }
}
