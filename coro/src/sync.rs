//! Coroutine-aware mutex and condition queue (QEMU's CoMutex and CoQueue).
//!
//! They park the *task*, not the thread: a task that waits lets the scheduler run the
//! others. Both are single-threaded (`!Sync`): share them between tasks of one scheduler
//! with `Rc`. Waiters are served strictly first-in first-out, and the mutex is handed
//! directly to the next waiter on unlock, so a task that unlocks and immediately relocks
//! cannot starve the others.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

use crate::sched::{self, TaskId};

/// A mutual-exclusion lock for tasks of one scheduler.
pub struct Mutex<T> {
    locked: Cell<bool>,
    /// Set on unlock to the waiter that now owns the lock.
    handed_to: Cell<Option<TaskId>>,
    waiters: RefCell<VecDeque<TaskId>>,
    value: UnsafeCell<T>,
}

/// Proof of holding a [`Mutex`]; unlocks on drop.
pub struct MutexGuard<'a, T> {
    mutex: &'a Mutex<T>,
}

impl<T> Mutex<T> {
    /// An unlocked mutex holding `value`.
    pub fn new(value: T) -> Mutex<T> {
        Mutex {
            locked: Cell::new(false),
            handed_to: Cell::new(None),
            waiters: RefCell::new(VecDeque::new()),
            value: UnsafeCell::new(value),
        }
    }

    /// Locks, parking the current task while another holds the lock.
    ///
    /// # Panics
    /// If it must wait outside a task of a running scheduler.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        if !self.locked.replace(true) {
            return MutexGuard { mutex: self };
        }
        let me = sched::current_task();
        self.waiters.borrow_mut().push_back(me);
        loop {
            sched::park();
            if self.handed_to.get() == Some(me) {
                self.handed_to.set(None);
                return MutexGuard { mutex: self };
            }
        }
    }

    /// Locks if free, without waiting.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        (!self.locked.replace(true)).then_some(MutexGuard { mutex: self })
    }

    fn unlock(&self) {
        let next = self.waiters.borrow_mut().pop_front();
        match next {
            Some(id) => {
                // Stays locked: ownership passes straight to the first waiter.
                self.handed_to.set(Some(id));
                sched::wake(id);
            }
            None => self.locked.set(false),
        }
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard proves exclusive ownership of the lock.
        unsafe { &*self.mutex.value.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves exclusive ownership of the lock.
        unsafe { &mut *self.mutex.value.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

/// A queue of parked tasks waiting for a condition (QEMU's CoQueue; a condition variable).
#[derive(Default)]
pub struct Condvar {
    waiters: RefCell<VecDeque<(TaskId, Rc<Cell<bool>>)>>,
}

impl Condvar {
    /// An empty queue.
    pub fn new() -> Condvar {
        Condvar::default()
    }

    /// Unlocks `guard`, parks until notified, relocks. As with any condition variable, check
    /// the condition in a loop around this call.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        let mutex = guard.mutex;
        let flag = self.enqueue();
        drop(guard);
        while !flag.get() {
            sched::park();
        }
        mutex.lock()
    }

    fn enqueue(&self) -> Rc<Cell<bool>> {
        let flag = Rc::new(Cell::new(false));
        self.waiters
            .borrow_mut()
            .push_back((sched::current_task(), flag.clone()));
        flag
    }

    /// Wakes the longest-waiting task; returns whether there was one.
    pub fn notify_one(&self) -> bool {
        let next = self.waiters.borrow_mut().pop_front();
        match next {
            Some((id, flag)) => {
                flag.set(true);
                sched::wake(id);
                true
            }
            None => false,
        }
    }

    /// Whether no task is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiters.borrow().is_empty()
    }
}
