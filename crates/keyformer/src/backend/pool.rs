//! The process's one worker team: `threads - 1` workers plus the calling thread.
//!
//! Decoding one token dispatches about eight parallel loops per layer (250 per token on
//! SmolLM2), each only tens of microseconds long. A pool whose idle workers sleep on a futex
//! pays a wake-up (several microseconds, more when the scheduler is busy) at every one of them:
//! with rayon that was 10-35% of decode time on 2 cores. Here idle workers spin on a generation
//! counter for a short while ([`SPIN_TIME`]) before they sleep, so back-to-back dispatches of a
//! decode step cost a cache-line handoff, and an idle process still sleeps. The caller runs
//! tasks too, so `threads` cores do the work with no over-subscription.
//!
//! Tasks are claimed one at a time from an atomic counter (dynamic balance). A loop started
//! from inside a task runs inline on that thread (no nesting). Several threads may dispatch at
//! once; their loops run one after another.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN_TIME: Duration = Duration::from_millis(2);

static POOL: OnceLock<Pool> = OnceLock::new();
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set while this thread runs a task: loops started inside run inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// The pool was already started with another size.
#[derive(Debug, thiserror::Error)]
#[error("the thread pool already runs {running} threads; {requested} requested")]
pub struct PoolSizeError {
    pub running: usize,
    pub requested: usize,
}

/// Size the pool (the calling thread counts as one). Call before the first parallel loop;
/// afterwards only the size it already has is accepted.
/// Physical cores this process may run on (hyper-threads of one core count once), as
/// llama.cpp's default thread count; the logical count where the topology cannot be read.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let read = |cpu: usize, what: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{what}")).ok()
    };
    let mut cores = std::collections::BTreeSet::new();
    for cpu in 0..1024 {
        let (Some(package), Some(core)) = (read(cpu, "physical_package_id"), read(cpu, "core_id")) else {
            if cpu == 0 {
                return logical;
            }
            break;
        };
        cores.insert((package, core));
    }
    cores.len().clamp(1, logical)
}

pub fn set_threads(n: usize) -> Result<(), PoolSizeError> {
    let n = n.max(1);
    REQUESTED.store(n, Ordering::SeqCst);
    let running = pool().threads();
    if running != n {
        return Err(PoolSizeError { running, requested: n });
    }
    Ok(())
}

/// Threads that run parallel loops (workers + the caller).
pub fn threads() -> usize {
    pool().threads()
}

/// Run `f(0) .. f(n_tasks - 1)` across the pool; returns when all have finished. A panic in a
/// task is re-raised here after every thread has left the loop.
pub fn for_each(n_tasks: usize, f: impl Fn(usize) + Sync) {
    if n_tasks == 0 {
        return;
    }
    let pool = pool();
    if n_tasks == 1 || pool.workers == 0 || IN_TASK.with(Cell::get) {
        (0..n_tasks).for_each(f);
        return;
    }
    pool.run(n_tasks, &f);
}

/// `(0..n_tasks).map(f).collect()`, computed across the pool.
pub fn map<T: Send>(n_tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n_tasks).map(|_| None).collect();
    let slots = SharedSlots(out.as_mut_ptr());
    for_each(n_tasks, |i| {
        let slots = &slots;
        // SAFETY: task i is run exactly once and writes only element i; `out` outlives the loop.
        unsafe { *slots.0.add(i) = Some(f(i)) };
    });
    out.into_iter().map(|v| v.expect("every task ran")).collect()
}

struct SharedSlots<T>(*mut Option<T>);
unsafe impl<T: Send> Sync for SharedSlots<T> {}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let requested = REQUESTED.load(Ordering::SeqCst);
        let n = if requested > 0 { requested } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        Pool::start(n)
    })
}

/// The job every worker runs: a type-erased `&dyn Fn(usize)` that lives on the dispatcher's
/// stack until the dispatcher has seen every worker leave it.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n_tasks: usize,
}

struct Shared {
    /// Bumped once per job; workers wait for it to change.
    generation: AtomicU64,
    /// Written by the dispatcher only while no worker is inside a job.
    job: UnsafeCell<Job>,
    next_task: AtomicUsize,
    /// Workers that have not yet left the current job.
    busy_workers: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only between jobs (no worker reads it then), see `Pool::run`.
unsafe impl Sync for Shared {}

struct Pool {
    workers: usize,
    shared: &'static Shared,
    /// One dispatcher at a time.
    dispatch: Mutex<()>,
}

impl Pool {
    fn start(threads: usize) -> Self {
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(Job { f: noop, n_tasks: 0 }),
            next_task: AtomicUsize::new(0),
            busy_workers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut workers = 0;
        for i in 1..threads {
            let spawned =
                std::thread::Builder::new().name(format!("keyformer-worker-{i}")).spawn(move || worker_loop(shared));
            if spawned.is_ok() {
                workers += 1;
            }
        }
        Pool { workers, shared, dispatch: Mutex::new(()) }
    }

    fn threads(&self) -> usize {
        self.workers + 1
    }

    fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let _one_at_a_time = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: we return only
        // after `busy_workers` is 0, i.e. after every worker has stopped using `f`.
        let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        // SAFETY: no worker is inside a job (the previous run waited for all of them).
        unsafe { *s.job.get() = Job { f, n_tasks } };
        s.next_task.store(0, Ordering::Relaxed);
        s.busy_workers.store(self.workers, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| run_tasks(s)));
        let mut spins = 0u32;
        while s.busy_workers.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins % 4096 == 0 {
                std::thread::yield_now(); // a worker was descheduled: let it run
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a task of a parallel loop panicked on a worker thread");
        }
    }
}

/// Claim and run tasks of the current job until none is left.
fn run_tasks(s: &Shared) {
    // SAFETY: the job was published before the generation bump this thread observed.
    let job = unsafe { *s.job.get() };
    let f = unsafe { &*job.f };
    IN_TASK.with(|t| t.set(true));
    let _reset = ResetInTask;
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= job.n_tasks {
            break;
        }
        f(i);
    }
}

struct ResetInTask;
impl Drop for ResetInTask {
    fn drop(&mut self) {
        IN_TASK.with(|t| t.set(false));
    }
}

fn worker_loop(s: &'static Shared) {
    // Generation 0 is the pool's start: a job dispatched before this thread first runs is
    // still seen as new.
    let mut seen = 0;
    loop {
        seen = wait_for_job(s, seen);
        if catch_unwind(AssertUnwindSafe(|| run_tasks(s))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.busy_workers.fetch_sub(1, Ordering::Release);
    }
}

/// Spin until the generation moves past `seen`, sleeping once [`SPIN_TIME`] has passed.
fn wait_for_job(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let g = s.generation.load(Ordering::Acquire);
        if g != seen {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins % 1024 != 0 || start.elapsed() < SPIN_TIME {
            std::hint::spin_loop();
            continue;
        }
        let mut guard = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        while s.generation.load(Ordering::SeqCst) == seen {
            guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        return s.generation.load(Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_results_keep_their_order() {
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "n={n}");
            assert_eq!(map(n, |i| i * i), (0..n).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn nested_loops_run_inline_and_concurrent_callers_are_serialised() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        for_each(8, |_| {
                            for_each(4, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 4);
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller_and_the_pool_keeps_working() {
        let r = catch_unwind(|| for_each(64, |i| assert!(i != 40, "task 40 fails")));
        assert!(r.is_err());
        // Let idle workers fall asleep, then check they wake for the next loop.
        std::thread::sleep(SPIN_TIME * 3);
        assert_eq!(map(64, |i| i + 1).iter().sum::<usize>(), (1..=64usize).sum::<usize>());
    }
}
