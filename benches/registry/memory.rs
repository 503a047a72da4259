//! A counting global allocator, for the bench's heap figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting per thread what each thread allocates and frees.
///
/// Counters are thread-local so that counting adds no shared atomic to the hot path: a
/// shared counter would bounce one cache line between the service and server threads.
/// A block freed by a thread other than the one that allocated it shows up on the wrong
/// thread, so the figures are exact only for windows in which one thread does all the work.
pub struct CountingAllocator;

/// Heap activity of the current thread since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapCounts {
    /// Calls to `alloc`, `alloc_zeroed` and `realloc`.
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
}

impl HeapCounts {
    /// Live bytes added between `earlier` and `self`, negative when more was freed.
    pub fn live_bytes_since(&self, earlier: &HeapCounts) -> i64 {
        let allocated = self.allocated_bytes - earlier.allocated_bytes;
        let freed = self.freed_bytes - earlier.freed_bytes;
        allocated as i64 - freed as i64
    }

    /// Allocation calls between `earlier` and `self`.
    pub fn allocations_since(&self, earlier: &HeapCounts) -> u64 {
        self.allocations - earlier.allocations
    }
}

thread_local! {
    // A `const` initialiser and a type without `Drop` need no lazy initialisation and no
    // destructor, so reading the counters cannot allocate, which an allocator requires.
    static COUNTS: Cell<HeapCounts> = const {
        Cell::new(HeapCounts { allocations: 0, allocated_bytes: 0, freed_bytes: 0 })
    };
}

fn record(allocations: u64, allocated_bytes: usize, freed_bytes: usize) {
    let _ = COUNTS.try_with(|counts| {
        let mut current = counts.get();
        current.allocations += allocations;
        current.allocated_bytes += allocated_bytes as u64;
        current.freed_bytes += freed_bytes as u64;
        counts.set(current);
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the counting around it neither allocates nor touches the returned memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            record(1, layout.size(), 0);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            record(1, layout.size(), 0);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        record(0, 0, layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            record(1, new_size, layout.size());
        }
        moved
    }
}

/// Returns the heap counts of the calling thread.
pub fn thread_heap_counts() -> HeapCounts {
    COUNTS.with(Cell::get)
}
