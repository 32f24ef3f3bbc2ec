//! For the unit tests of both sides: a process that dies at an exact step. Each call to
//! [`CrashPoint::step`] is one step; at the chosen one the future never returns, as if the
//! process died there (a test drops it after a timeout).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug)]
pub enum Crash {
    /// The process dies as step N starts: it has no effect.
    Before(usize),
    /// Step N takes effect, then the process dies before it records that.
    After(usize),
}

impl Crash {
    /// No crash, then a crash before and after each of `steps` steps.
    pub fn all(steps: usize) -> impl Iterator<Item = Option<Crash>> {
        std::iter::once(None)
            .chain((1..=steps).flat_map(|at| [Some(Crash::Before(at)), Some(Crash::After(at))]))
    }
}

pub struct CrashPoint {
    crash: Option<Crash>,
    steps: AtomicUsize,
}

impl CrashPoint {
    pub fn new(crash: Option<Crash>) -> Self {
        Self {
            crash,
            steps: AtomicUsize::new(0),
        }
    }

    /// Runs one step's `effect` on `world`, unless the process dies around it.
    pub async fn step<W, T>(&self, world: &Mutex<W>, effect: impl FnOnce(&mut W) -> T) -> T {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if matches!(self.crash, Some(Crash::Before(at)) if at == n) {
            std::future::pending::<()>().await;
        }
        let result = effect(&mut world.lock().unwrap());
        if matches!(self.crash, Some(Crash::After(at)) if at == n) {
            std::future::pending::<()>().await;
        }
        result
    }

    /// How many steps were taken.
    pub fn taken(&self) -> usize {
        self.steps.load(Ordering::SeqCst)
    }
}
