//! Workgroup counts for a launch over a byte range, in up to three dimensions.
//!
//! A launch takes at most [`MAX_WORKGROUPS`] workgroups in each dimension, so one dimension
//! covers 65 535 x 64 x 4 bytes (16 MiB) for a 64-lane kernel that handles a word per lane.
//! [`workgroups`] spreads a larger range over a second and then a third dimension, and the
//! helper every kernel is compiled with turns the 3-D position back into one index:
//! `hm_invocation(workgroup_id, num_workgroups, local_invocation_index, workgroup_size)`.

use crate::error::{Error, Result};

/// The most workgroups a launch takes in one dimension.
pub const MAX_WORKGROUPS: u32 = 65_535;

/// The workgroup counts that cover `bytes` bytes with one invocation per
/// `bytes_per_invocation` bytes, `workgroup_size` invocations per workgroup (the kernel's
/// `@workgroup_size`), for [`Context::launch`](super::Context::launch).
///
/// The counts are `[x, 1, 1]` while one dimension suffices, then `[x, y, 1]`, then
/// `[x, y, z]`, with the fewest extra workgroups: the grid can hold a few more invocations
/// than the range needs, so a kernel compares its index (`hm_invocation`) with the range's
/// size. Fails with [`Error::TooManyInvocations`] when three dimensions are too few or the
/// count passes 2^32 (the index is a `u32`), and with [`Error::InvalidArgument`] for zero
/// bytes, bytes per invocation or workgroup size.
///
/// ```
/// use hetmem::offload::workgroups;
///
/// // 64 MiB, a 4-byte word per invocation, 64 invocations per workgroup: 262 144
/// // workgroups, more than one dimension holds.
/// let [x, y, z] = workgroups(64 << 20, 4, 64)?;
/// assert_eq!((x, y, z), (52_429, 5, 1));
/// assert!(u64::from(x) * u64::from(y) * 64 * 4 >= 64 << 20);
/// assert_eq!(workgroups(4096, 4, 64)?, [16, 1, 1]);
/// # Ok::<(), hetmem::Error>(())
/// ```
pub fn workgroups(
    bytes: usize,
    bytes_per_invocation: usize,
    workgroup_size: u32,
) -> Result<[u32; 3]> {
    if bytes == 0 || bytes_per_invocation == 0 || workgroup_size == 0 {
        return Err(Error::InvalidArgument(
            "workgroups: bytes, bytes per invocation and workgroup size must be nonzero",
        ));
    }
    let invocations = (bytes as u64).div_ceil(bytes_per_invocation as u64);
    let groups = invocations.div_ceil(u64::from(workgroup_size));
    let too_many = Error::TooManyInvocations { invocations };
    // The index hm_invocation computes, over every workgroup of the grid, must fit a u32.
    if groups.saturating_mul(u64::from(workgroup_size)) > 1 << 32 {
        return Err(too_many);
    }
    let max = u64::from(MAX_WORKGROUPS);
    let layers = groups.div_ceil(max * max);
    if layers > max {
        return Err(too_many);
    }
    let per_layer = groups.div_ceil(layers);
    let rows = per_layer.div_ceil(max);
    let x = per_layer.div_ceil(rows);
    let grid = [x, rows, layers].map(|n| u32::try_from(n).expect("at most MAX_WORKGROUPS"));
    // The rounded-up grid may still index past 2^32 by its few extra workgroups.
    if x * rows * layers * u64::from(workgroup_size) > 1 << 32 {
        return Err(too_many);
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(g: [u32; 3], size: u32) -> u64 {
        g.iter().map(|&n| u64::from(n)).product::<u64>() * u64::from(size)
    }

    #[test]
    fn a_64_mib_buffer_needs_a_second_dimension() {
        let g = workgroups(64 << 20, 4, 64).unwrap();
        assert!(
            g.iter().all(|&n| (1..=MAX_WORKGROUPS).contains(&n)),
            "{g:?}"
        );
        assert_eq!(g[2], 1);
        assert!(
            g[1] > 1,
            "262 144 workgroups do not fit one dimension: {g:?}"
        );
        let invocations = (64u64 << 20) / 4;
        let c = covered(g, 64);
        assert!(c >= invocations, "{g:?} covers {c}");
        // Fewer than one extra workgroup per row.
        assert!(c - invocations < u64::from(g[1]) * 64, "{g:?} covers {c}");
    }

    #[test]
    fn one_dimension_while_it_suffices() {
        assert_eq!(workgroups(1, 4, 64).unwrap(), [1, 1, 1]);
        assert_eq!(workgroups(4097, 4, 64).unwrap(), [17, 1, 1]);
        let full = 65_535 * 64 * 4;
        assert_eq!(workgroups(full, 4, 64).unwrap(), [65_535, 1, 1]);
        assert_eq!(workgroups(full + 1, 4, 64).unwrap(), [32_768, 2, 1]);
    }

    #[test]
    fn a_third_dimension_and_then_an_error() {
        // One invocation per byte, one per workgroup: just past what two dimensions hold.
        let two_d = 65_535usize * 65_535;
        let g = workgroups(two_d + 1, 1, 1).unwrap();
        assert_eq!(g[2], 2, "{g:?}");
        assert!(covered(g, 1) > two_d as u64);
        assert!(covered(g, 1) <= 1 << 32);
        let e = workgroups(1 << 40, 1, 64).unwrap_err();
        assert!(
            matches!(e, Error::TooManyInvocations { invocations } if invocations == 1 << 40),
            "{e:?}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::Misuse);
        let e = workgroups(usize::MAX, 1, 1).unwrap_err();
        assert!(matches!(e, Error::TooManyInvocations { .. }), "{e:?}");
    }

    #[test]
    fn zero_sizes_are_refused() {
        for (b, per, size) in [(0, 4, 64), (4096, 0, 64), (4096, 4, 0)] {
            let e = workgroups(b, per, size).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        }
    }
}
