//! Physical Region Page lists (NVMe 1.4, 4.3): how a command points at its data, and
//! whether a request's buffers can be pointed at directly (zero copy) or must be bounced.
//!
//! The backend maps memory for DMA at IOVA = its virtual address, so a buffer's address
//! is its PRP entry. A PRP list can describe memory whose first piece may start anywhere
//! in a page (dword-aligned) and whose other pieces start on a page; every piece but the
//! last must end on a page. Guest buffers from Linux's virtio_blk are page pieces, so they
//! nearly always pass; the rest is copied through a bounce buffer.

use super::spec::PAGE;

const PAGE64: u64 = PAGE as u64;

/// Most PRP entries in one command: entry 1, plus a one-page list of 512 (no chaining).
pub const MAX_PAGES: usize = 1 + PAGE / 8;

/// Whether `segs` (address, length) can be described by a PRP list as they are.
pub fn direct(segs: &[(u64, u64)]) -> bool {
    let last = segs.len().saturating_sub(1);
    segs.iter().enumerate().all(|(i, &(addr, len))| {
        len > 0
            && addr % 4 == 0
            && (i == 0 || addr % PAGE64 == 0)
            && (i == last || (addr + len) % PAGE64 == 0)
    })
}

/// The largest transfer (a multiple of `block`) one command may move, given the
/// controller's limit in pages: with a first piece at any offset, `pages - 1` whole pages
/// always fit; also at most 65536 blocks (a 16-bit count).
pub fn max_transfer(controller_pages: usize, block: u64) -> u64 {
    let pages = controller_pages.clamp(2, MAX_PAGES) as u64;
    let bytes = ((pages - 1) * PAGE64).min(65536 * block);
    bytes / block * block
}

/// Calls `emit` with the PRP entries of `len` bytes at byte `from` of `segs` (which pass
/// [`direct`]): the address of the first byte, then each following page. Returns how many.
pub fn entries(segs: &[(u64, u64)], from: u64, len: u64, mut emit: impl FnMut(u64)) -> usize {
    let mut skip = from;
    let mut left = len;
    let mut n = 0;
    for &(addr, seg_len) in segs {
        if left == 0 {
            break;
        }
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let start = addr + skip;
        let end = start + (seg_len - skip).min(left);
        left -= end - start;
        skip = 0;
        let mut cur = start;
        while cur < end {
            emit(cur);
            n += 1;
            cur = (cur & !(PAGE64 - 1)) + PAGE64;
        }
    }
    n
}

/// PRP entry 1 and 2 for `len` bytes at `from` of `segs`: entry 2 is the second page, or
/// `list_iova`, the page `list` is, when there are more than two (`list` receives entries
/// 2 onwards). `None` if more than [`MAX_PAGES`] entries would be needed.
///
/// # Safety
/// `list` must be valid for writes of `PAGE / 8` u64s, and not read by the device until
/// the command using it is submitted.
pub unsafe fn build(
    segs: &[(u64, u64)],
    from: u64,
    len: u64,
    list: *mut u64,
    list_iova: u64,
) -> Option<(u64, u64)> {
    let mut first = 0;
    let mut second = 0;
    let mut i = 0usize;
    let mut overflow = false;
    entries(segs, from, len, |addr| {
        match i {
            0 => first = addr,
            _ if i > PAGE / 8 => overflow = true,
            _ => {
                if i == 1 {
                    second = addr;
                }
                // SAFETY: `i - 1` < PAGE / 8 entries, which the caller guarantees `list`
                // holds; volatile because the device reads the page by DMA.
                unsafe { list.add(i - 1).write_volatile(addr) };
            }
        }
        i += 1;
    });
    match i {
        _ if overflow => None,
        0 | 1 => Some((first, 0)),
        2 => Some((first, second)),
        _ => Some((first, list_iova)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_pieces_go_direct_and_the_rest_is_bounced() {
        assert!(direct(&[(0x1000, 0x3000)]));
        assert!(direct(&[
            (0x1200, 0xe00),
            (0x5000, 0x1000),
            (0x9000, 0x200)
        ]));
        assert!(
            !direct(&[(0x1000, 0x200), (0x3000, 0x200)]),
            "a middle end off a page"
        );
        assert!(
            !direct(&[(0x1000, 0x1000), (0x3200, 0x200)]),
            "a later start off a page"
        );
        assert!(!direct(&[(0x1002, 0x200)]), "not dword-aligned");
        assert!(!direct(&[(0x1000, 0)]), "an empty piece");
    }

    fn collect(segs: &[(u64, u64)], from: u64, len: u64) -> Vec<u64> {
        let mut v = Vec::new();
        entries(segs, from, len, |a| v.push(a));
        v
    }

    #[test]
    fn entries_are_the_first_byte_then_each_page() {
        let segs = [(0x1200, 0xe00), (0x5000, 0x2000), (0x9000, 0x200)];
        assert_eq!(collect(&segs, 0, 0x3000), [0x1200, 0x5000, 0x6000, 0x9000]);
        assert_eq!(collect(&segs, 0x1000, 0x1000), [0x5200, 0x6000]);
        assert_eq!(collect(&segs, 0xe00, 0x1000), [0x5000]);
    }

    #[test]
    fn two_entries_inline_more_in_the_list_too_many_refused() {
        let mut list = [0u64; PAGE / 8];
        let p = list.as_mut_ptr();
        // SAFETY: `list` is a page of u64s on this stack, read only here.
        let one = unsafe { build(&[(0x1000, 0x1000)], 0, 0x1000, p, 0xabc000) };
        assert_eq!(one, Some((0x1000, 0)));
        // SAFETY: as above.
        let two = unsafe { build(&[(0x1800, 0x1800)], 0, 0x1800, p, 0xabc000) };
        assert_eq!(two, Some((0x1800, 0x2000)));
        // SAFETY: as above.
        let four = unsafe { build(&[(0x10000, 0x4000)], 0, 0x4000, p, 0xabc000) };
        assert_eq!(four, Some((0x10000, 0xabc000)));
        assert_eq!(list[..3], [0x11000, 0x12000, 0x13000]);
        let big = [(0x100000, (MAX_PAGES as u64 + 1) * PAGE64)];
        // SAFETY: as above.
        assert_eq!(unsafe { build(&big, 0, big[0].1, p, 0) }, None);
        // SAFETY: as above.
        assert!(unsafe { build(&big, 0, MAX_PAGES as u64 * PAGE64, p, 0) }.is_some());
    }

    #[test]
    fn max_transfer_leaves_room_for_an_unaligned_start() {
        assert_eq!(max_transfer(32, 512), 31 * 4096);
        assert_eq!(max_transfer(usize::MAX, 512), 512 * 4096);
        assert_eq!(max_transfer(usize::MAX, 4096), 512 * 4096);
        assert_eq!(max_transfer(1, 512), 4096, "at least a page");
    }
}
