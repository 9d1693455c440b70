//! A worker thread's handle on the guest memory map, cloned once per request.
//!
//! A request holds the memory map it was parsed against, so its buffers stay mapped while
//! it is in flight, even if the frontend replaces the memory table meanwhile. Holding it
//! through an `Arc` clone costs two atomic read-modify-writes per request (the clone, and
//! the drop at completion), plus two more for the descriptor chain's own handle, all on the
//! one reference count that every worker thread of the connection shares. With several
//! workers, that cache line moves between their cores on every request and they
//! serialize on it. A [`GuestMap`] is an `Rc` of the `Arc`: a worker makes one for each
//! memory table it serves, and its requests and chains clone that: a plain increment in
//! memory no other thread touches. The map is unmapped once the last `GuestMap` of every
//! worker, and every other `Arc`, is gone, as before.

use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

/// One thread's shared handle on a guest memory map: cheap to clone, `!Send` by design
/// (see the module docs).
#[expect(
    clippy::redundant_allocation,
    reason = "the Rc is the point: a per-thread count in front of the shared one"
)]
pub struct GuestMap<B: Bitmap + 'static = ()>(Rc<Arc<GuestMemoryMmap<B>>>);

impl<B: Bitmap + 'static> GuestMap<B> {
    /// A handle on `map` for the calling thread.
    pub fn new(map: Arc<GuestMemoryMmap<B>>) -> Self {
        GuestMap(Rc::new(map))
    }

    /// Whether this handle is on `map` (the same mapping, not an equal one).
    pub fn is(&self, map: &GuestMemoryMmap<B>) -> bool {
        std::ptr::eq(&**self.0, map)
    }
}

impl<B: Bitmap + 'static> Clone for GuestMap<B> {
    fn clone(&self) -> Self {
        GuestMap(Rc::clone(&self.0))
    }
}

impl<B: Bitmap + 'static> Deref for GuestMap<B> {
    type Target = GuestMemoryMmap<B>;

    fn deref(&self) -> &GuestMemoryMmap<B> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn map() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("map"))
    }

    #[test]
    fn clones_share_the_map_without_touching_its_count() {
        let shared = map();
        let handle = GuestMap::new(shared.clone());
        assert_eq!(Arc::strong_count(&shared), 2);
        let requests: Vec<_> = (0..32).map(|_| handle.clone()).collect();
        assert_eq!(Arc::strong_count(&shared), 2, "a clone touched the Arc");
        assert!(requests.iter().all(|r| r.is(&shared)));
        drop(handle);
        assert_eq!(Arc::strong_count(&shared), 2, "requests keep the map");
        drop(requests);
        assert_eq!(Arc::strong_count(&shared), 1, "the last handle released it");
    }

    #[test]
    fn is_tells_maps_apart() {
        let (a, b) = (map(), map());
        let handle = GuestMap::new(a.clone());
        assert!(handle.is(&a));
        assert!(!handle.is(&b), "an equal map is another mapping");
    }
}
