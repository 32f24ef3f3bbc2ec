//! Memory workload: its resident size and dirty rate drive pre-copy migration
//! time and downtime, and its self-checking content shows whether memory came
//! through a checkpoint/restore intact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use workloads::{env_or, exit_on_termination, help_if_asked, say};

const PAGE_WORDS: usize = 4096 / 8;

/// One 4 KiB page, aligned so that each logical page is exactly one kernel
/// page: rewriting it then dirties one page for the migration's dirty tracking,
/// not two.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u64; PAGE_WORDS]);

/// splitmix64 step: cheap, and its output depends on the whole seed, so a page
/// holding another page's or another generation's data never passes.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seed(index: usize, generation: u32) -> u64 {
    ((index as u64) << 32) ^ u64::from(generation) ^ 0x6D65_6D68_6F67_0000
}

fn fill(page: &mut Page, index: usize, generation: u32) {
    page.0[0] = index as u64;
    page.0[1] = u64::from(generation);
    let mut state = seed(index, generation);
    for w in &mut page.0[2..] {
        *w = splitmix(&mut state);
    }
}

/// `expected` comes from the separate generation table: a page that is
/// internally consistent but stale (an older generation, e.g. a dirty page the
/// migration failed to resend) must fail too.
fn check(page: &Page, index: usize, expected: u32) -> bool {
    if page.0[0] != index as u64 || page.0[1] != u64::from(expected) {
        return false;
    }
    let mut state = seed(index, expected);
    page.0[2..].iter().all(|&w| w == splitmix(&mut state))
}

fn main() {
    help_if_asked(
        "memhog: holds self-checking memory and rewrites part of it every second; SIGUSR1\n\
         checks every page and prints `memhog: verify ok pages=N` (or what is wrong).\n\n\
         Takes no arguments. Environment:\n  \
         MEMHOG_MIB            resident memory to fill, MiB (default 64)\n  \
         MEMHOG_DIRTY_PERCENT  share of the pages rewritten per second (default 0)",
    );
    exit_on_termination();
    let mib: usize = env_or("MEMHOG_MIB", 64);
    let dirty_percent: f64 = env_or("MEMHOG_DIRTY_PERCENT", 0.0);
    if !(dirty_percent.is_finite() && dirty_percent >= 0.0) {
        eprintln!("memhog: MEMHOG_DIRTY_PERCENT must be >= 0");
        std::process::exit(2);
    }

    // The flag is only set in the handler; verification (far too much work
    // for a signal handler) runs in the main loop.
    let verify_requested = Arc::new(AtomicBool::new(false));
    if let Err(e) =
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&verify_requested))
    {
        eprintln!("memhog: cannot install SIGUSR1 handler: {e}");
        std::process::exit(1);
    }

    let pages = mib * 256;
    // Writing every page up front makes all of it resident, so the size the
    // migration sees is the configured one from the start.
    let mut mem: Vec<Page> = Vec::with_capacity(pages);
    for i in 0..pages {
        let mut p = Page([0; PAGE_WORDS]);
        fill(&mut p, i, 0);
        mem.push(p);
    }
    let mut generations = vec![0u32; pages];
    say(&format!("memhog: ready mib={mib} pages={pages}"));

    let pages_per_sec = pages as f64 * dirty_percent / 100.0;
    // Small steps spread the writes over each second, like a real workload,
    // instead of one burst the migration could happen to miss.
    let tick = if pages_per_sec > 0.0 {
        Duration::from_millis(10)
    } else {
        Duration::from_millis(50)
    };
    let mut owed = 0.0f64;
    // Sequential rewrites make the rate mean distinct pages per second.
    let mut cursor = 0usize;
    let mut last = Instant::now();

    loop {
        thread::sleep(tick);

        if verify_requested.swap(false, Ordering::SeqCst) {
            let bad = (0..pages).find(|&i| !check(&mem[i], i, generations[i]));
            match bad {
                None => say(&format!("memhog: verify ok pages={pages}")),
                Some(i) => say(&format!("memhog: verify FAILED page={i}")),
            }
            // Time spent verifying must not turn into a burst of catch-up
            // writes.
            last = Instant::now();
            continue;
        }

        if pages == 0 || pages_per_sec <= 0.0 {
            continue;
        }
        let now = Instant::now();
        // Capping the elapsed time stops a freeze (checkpoint, restore onto a
        // host with a different clock) from being paid back as one burst.
        let dt = now.duration_since(last).min(Duration::from_millis(100));
        last = now;
        owed += pages_per_sec * dt.as_secs_f64();
        let n = owed.floor();
        owed -= n;
        for _ in 0..n as usize {
            let generation = generations[cursor].wrapping_add(1);
            fill(&mut mem[cursor], cursor, generation);
            generations[cursor] = generation;
            cursor = (cursor + 1) % pages;
        }
    }
}
