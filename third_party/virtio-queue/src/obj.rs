// corodev patch: a whole object read or written with one region lookup and one volatile
// access when it lies within one region, as a ring's descriptors and used elements do.
// `Bytes::read_obj`/`write_obj` go through a slice iterator and a byte copy for the case
// of an object split across regions; that generic path was a tenth of a busy vhost-user
// backend's time. The split case still takes it, so behaviour is unchanged.

use std::mem::size_of;

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileMemory,
};

/// Reads a `T` at `addr` (see the module docs).
pub(crate) fn read<T: ByteValued, M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
) -> Result<T, GuestMemoryError> {
    if let Ok(mut slices) = mem.get_slices(addr, size_of::<T>(), Permissions::Read) {
        if let Some(Ok(slice)) = slices.next() {
            if let Ok(obj) = slice.get_ref::<T>(0) {
                return Ok(obj.load());
            }
        }
    }
    mem.read_obj(addr)
}

/// Writes `val` at `addr` (see the module docs).
pub(crate) fn write<T: ByteValued, M: GuestMemory + ?Sized>(
    mem: &M,
    val: T,
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    if let Ok(mut slices) = mem.get_slices(addr, size_of::<T>(), Permissions::Write) {
        if let Some(Ok(slice)) = slices.next() {
            if let Ok(obj) = slice.get_ref::<T>(0) {
                obj.store(val);
                return Ok(());
            }
        }
    }
    mem.write_obj(val, addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    use crate::desc::split::Descriptor;

    /// Two adjacent regions, so an object can lie in one or straddle both.
    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn objects_in_one_region_and_across_two_read_back_as_written() {
        let mem = two_regions();
        let desc = Descriptor::new(0x1234_5678_9abc, 0x200, 1, 7);
        // Inside the first region, unaligned; then straddling the boundary.
        for addr in [GuestAddress(0x13), GuestAddress(0x1000 - 8)] {
            write(&mem, desc, addr).unwrap();
            let raw: Descriptor = mem.read_obj(addr).unwrap();
            assert_eq!(
                (raw.addr(), raw.len(), raw.flags(), raw.next()),
                (desc.addr(), 0x200, 1, 7)
            );
            let back: Descriptor = read(&mem, addr).unwrap();
            assert_eq!(
                (back.addr(), back.len(), back.flags(), back.next()),
                (desc.addr(), 0x200, 1, 7)
            );
        }
    }

    #[test]
    fn objects_past_the_end_of_memory_are_refused() {
        let mem = two_regions();
        let desc = Descriptor::new(1, 2, 0, 0);
        assert!(read::<Descriptor, _>(&mem, GuestAddress(0x2000 - 8)).is_err());
        assert!(write(&mem, desc, GuestAddress(0x2000 - 8)).is_err());
        assert!(read::<Descriptor, _>(&mem, GuestAddress(0x5000)).is_err());
    }
}
