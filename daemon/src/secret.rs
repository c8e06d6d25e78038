//! Locked memory for unwrapped KEKs.
//!
//! One arena per process rather than pages per key: RLIMIT_MEMLOCK is small (8 MiB for
//! root, far less for an unprivileged worker), and a page per 32-byte key would exhaust it
//! at a few hundred keys. The arena is a list of chunks; each chunk is an anonymous mapping
//! with a PROT_NONE guard page on each side, locked with mlock (and the result checked:
//! memsec-style helpers ignore a failed mlock) and excluded from core dumps with
//! MADV_DONTDUMP. A [`KeySlot`] owns one 32-byte slot and wipes it when dropped.

#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use zeroize::Zeroize;

use crate::backend::KEK_LEN;

/// Slots per chunk: 64 KiB of keys, so 1 000 cached KEK versions fit in one chunk.
const SLOTS_PER_CHUNK: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map KEK memory: {0}")]
    Map(std::io::Error),
    #[error(
        "cannot lock KEK memory ({0}); raise RLIMIT_MEMLOCK (LimitMEMLOCK=) or set \
         allow_unlocked_memory = true for development only"
    )]
    Lock(std::io::Error),
}

struct Chunk {
    /// Start of the whole mapping, guard pages included.
    base: NonNull<u8>,
    map_len: usize,
    /// Start of the usable (locked) region, one page after `base`.
    data: NonNull<u8>,
}

// SAFETY: a Chunk is plain memory owned by the arena; every access to a slot goes through
// the KeySlot that exclusively owns it, and the free list is behind the arena's mutex.
unsafe impl Send for Chunk {}
// SAFETY: as above; a shared &Chunk only exposes addresses, never unsynchronised writes.
unsafe impl Sync for Chunk {}

struct Inner {
    chunks: Vec<Chunk>,
    /// Free slots as (chunk, index).
    free: Vec<(usize, usize)>,
}

/// The process's locked KEK memory.
pub struct LockedArena {
    inner: Mutex<Inner>,
    allow_unlocked: bool,
    locked: AtomicBool,
}

impl LockedArena {
    /// Creates the arena and its first chunk, so a memory-lock problem shows at start-up,
    /// not at the first request.
    pub fn new(allow_unlocked: bool) -> Result<Arc<Self>, MemoryError> {
        let arena = Arc::new(Self {
            inner: Mutex::new(Inner { chunks: Vec::new(), free: Vec::new() }),
            allow_unlocked,
            locked: AtomicBool::new(true),
        });
        arena.grow(&mut arena.inner.lock().expect("arena lock"))?;
        Ok(arena)
    }

    /// Whether every chunk is locked in RAM. False only with `allow_unlocked_memory`.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Takes a zeroed slot for one KEK.
    pub fn alloc(self: &Arc<Self>) -> Result<KeySlot, MemoryError> {
        let mut inner = self.inner.lock().expect("arena lock");
        if inner.free.is_empty() {
            self.grow(&mut inner)?;
        }
        let (chunk, index) = inner.free.pop().expect("grow added slots");
        // SAFETY: index < SLOTS_PER_CHUNK, so the offset stays inside the chunk's data region.
        let ptr = unsafe { inner.chunks[chunk].data.as_ptr().add(index * KEK_LEN) };
        Ok(KeySlot {
            arena: Arc::clone(self),
            chunk,
            index,
            ptr: NonNull::new(ptr).expect("inside a non-null mapping"),
        })
    }

    fn grow(&self, inner: &mut Inner) -> Result<(), MemoryError> {
        let page = page_size();
        let data_len = (SLOTS_PER_CHUNK * KEK_LEN).div_ceil(page) * page;
        let map_len = data_len + 2 * page;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MemoryError::Map(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(base.cast::<u8>()).expect("mmap succeeded");
        let chunk = Chunk {
            base,
            map_len,
            // SAFETY: page < map_len, so this stays inside the mapping.
            data: unsafe { NonNull::new_unchecked(base.as_ptr().add(page)) },
        };
        // From here on, dropping `chunk` unmaps it.
        let data = chunk.data.as_ptr().cast::<libc::c_void>();
        // SAFETY: `data..data+data_len` lies inside the mapping created above; the guard
        // pages before and after stay PROT_NONE so an overrun faults instead of leaking.
        if unsafe { libc::mprotect(data, data_len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
            return Err(MemoryError::Map(std::io::Error::last_os_error()));
        }
        // SAFETY: same region; MADV_DONTDUMP only changes core-dump behaviour.
        if unsafe { libc::madvise(data, data_len, libc::MADV_DONTDUMP) } != 0 {
            return Err(MemoryError::Map(std::io::Error::last_os_error()));
        }
        // SAFETY: same region; mlock has no memory-safety preconditions beyond a valid range.
        if unsafe { libc::mlock(data, data_len) } != 0 {
            let err = std::io::Error::last_os_error();
            if !self.allow_unlocked {
                return Err(MemoryError::Lock(err));
            }
            if self.locked.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    error = %err,
                    "KEK MEMORY IS NOT LOCKED: keys may be written to swap. \
                     allow_unlocked_memory = true is for development only"
                );
            }
        }
        let idx = inner.chunks.len();
        inner.chunks.push(chunk);
        inner.free.extend((0..SLOTS_PER_CHUNK).rev().map(|i| (idx, i)));
        Ok(())
    }

    #[cfg(test)]
    /// Bytes of KEK memory mapped, for status and tests.
    pub fn mapped_bytes(&self) -> usize {
        self.inner.lock().expect("arena lock").chunks.iter().map(|c| c.map_len).sum()
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let page = page_size();
        let data_len = self.map_len - 2 * page;
        // SAFETY: the data region is mapped read-write and no KeySlot outlives the arena
        // (each holds an Arc to it), so nothing else references this memory now.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), data_len) }.zeroize();
        // SAFETY: unmapping exactly the mapping created in `grow`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// One KEK's worth of locked memory. Not `Clone`, not `Debug`: there is exactly one owner,
/// and dropping it wipes the bytes before the slot is reused.
pub struct KeySlot {
    arena: Arc<LockedArena>,
    chunk: usize,
    index: usize,
    ptr: NonNull<u8>,
}

// SAFETY: the slot's memory is owned exclusively by this KeySlot; moving it between threads
// moves that ownership.
unsafe impl Send for KeySlot {}
// SAFETY: shared references only read the bytes; writes need &mut self.
unsafe impl Sync for KeySlot {}

impl KeySlot {
    pub fn bytes(&self) -> &[u8; KEK_LEN] {
        // SAFETY: ptr points at KEK_LEN bytes inside a live, read-write mapping (the arena
        // is kept alive by self.arena) that no other KeySlot owns.
        unsafe { &*self.ptr.as_ptr().cast::<[u8; KEK_LEN]>() }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8; KEK_LEN] {
        // SAFETY: as in `bytes`, and &mut self guarantees exclusive access.
        unsafe { &mut *self.ptr.as_ptr().cast::<[u8; KEK_LEN]>() }
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.bytes_mut().zeroize();
        self.arena.inner.lock().expect("arena lock").free.push((self.chunk, self.index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_zeroed_reused_and_distinct() {
        let arena = LockedArena::new(false).expect("root may lock 64 KiB");
        assert!(arena.is_locked());
        let mut a = arena.alloc().unwrap();
        let b = arena.alloc().unwrap();
        assert_ne!(a.ptr, b.ptr);
        a.bytes_mut().fill(0xAB);
        let addr = a.ptr;
        drop(a);
        // The freed slot is handed out again, and it was wiped.
        let c = arena.alloc().unwrap();
        assert_eq!(c.ptr, addr);
        assert_eq!(c.bytes(), &[0u8; KEK_LEN]);
    }

    #[test]
    fn arena_grows_past_one_chunk_and_reports_locked_memory() {
        let arena = LockedArena::new(false).unwrap();
        let slots: Vec<_> = (0..SLOTS_PER_CHUNK + 1).map(|_| arena.alloc().unwrap()).collect();
        assert_eq!(slots.len(), SLOTS_PER_CHUNK + 1);
        assert!(arena.mapped_bytes() >= 2 * SLOTS_PER_CHUNK * KEK_LEN);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_lck: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(vm_lck >= 128, "VmLck is {vm_lck} kB, expected the arena to be locked");
    }
}
