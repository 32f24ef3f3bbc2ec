//! A CRIU bug that makes a lazy dump copy all of the memory during the freeze, and how
//! the source steps around it.
//!
//! CRIU keeps the page under each thread's stack pointer out of the lazy pages: the
//! restored thread needs it at once. Its test, `is_stack` in `criu/mem.c` (since 2019; in
//! 4.2.1 and in upstream's master of 2025-11), masks with `~PAGE_MASK`: it compares the
//! offsets within the page, not the pages. So a page-aligned stack pointer matches every
//! (page-aligned) address, and CRIU writes the whole memory into the images during the
//! freeze, as a dump that is not lazy does (1 GiB froze 22-33 s in place of 3-4 s). memhog,
//! frozen in its write loop, has such a pointer: about one freeze in five at 100 % dirtied/s.
//!
//! A frozen thread's stack pointer moves as soon as it runs. So once the container's cgroup
//! is frozen, the source reads every thread's stack pointer (`/proc/<tid>/syscall`) and,
//! while one is page-aligned, lets the cgroup run for a moment and freezes it again. A
//! thread that sleeps on such a pointer keeps it: then the report says why the freeze is
//! long.

use std::time::Duration;

use anyhow::Result;

use crate::kernel::freezer;

/// Refreezes before giving up: a thread on a page-aligned pointer that is not asleep
/// leaves it within a few tries.
const ATTEMPTS: usize = 20;
/// How long the container runs between two freezes.
const RUN_FOR: Duration = Duration::from_millis(1);

/// What [`refreeze_off_aligned_stacks`] did.
pub struct Refrozen {
    /// How many times the cgroup was thawed and frozen again.
    pub times: usize,
    /// What the freeze will cost, if a stack pointer stayed page-aligned.
    pub costly: Option<String>,
}

/// With the cgroup `cgroup` frozen: refreezes it until no thread's stack pointer is
/// page-aligned (see the module doc). Blocking.
pub fn refreeze_off_aligned_stacks(cgroup: &str) -> Result<Refrozen> {
    let mut aligned = threads_on_aligned_stacks(cgroup)?;
    let mut refrozen = 0;
    while !aligned.is_empty() && refrozen < ATTEMPTS {
        freezer::thaw(cgroup)?;
        std::thread::sleep(RUN_FOR);
        freezer::freeze(cgroup)?;
        refrozen += 1;
        aligned = threads_on_aligned_stacks(cgroup)?;
    }
    let costly = (!aligned.is_empty()).then(|| {
        format!(
            "CRIU copies all of the memory during the freeze: the stack pointer of thread {aligned:?} stays page-aligned, and CRIU (is_stack in criu/mem.c) then takes every page for a stack page"
        )
    });
    Ok(Refrozen {
        times: refrozen,
        costly,
    })
}

/// The frozen threads of `cgroup` whose stack pointer is page-aligned.
fn threads_on_aligned_stacks(cgroup: &str) -> Result<Vec<i32>> {
    let page = rustix::param::page_size() as u64;
    Ok(freezer::threads(cgroup)?
        .into_iter()
        .filter(|tid| {
            // A thread that ended meanwhile has no pointer to worry about.
            std::fs::read_to_string(format!("/proc/{tid}/syscall"))
                .ok()
                .and_then(|line| stack_pointer(&line))
                .is_some_and(|sp| sp.is_multiple_of(page))
        })
        .collect())
}

/// The stack pointer in a line of `/proc/<tid>/syscall` of a stopped thread: the
/// second-to-last field, in a syscall (`230 0x1 ... sp pc`) or not (`-1 sp pc`); none for
/// one that runs (`running`).
fn stack_pointer(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    let sp = fields[fields.len() - 2].strip_prefix("0x")?;
    u64::from_str_radix(sp, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_pointer_is_read_in_and_out_of_a_syscall_and_not_of_a_running_thread() {
        let sleeping =
            "230 0x1 0x0 0x7fffbfa6efb8 0x7fffbfa6efb8 0x0 0x0 0x7fffbfa6ef80 0x7f8de76fd3a7\n";
        assert_eq!(stack_pointer(sleeping), Some(0x7fffbfa6ef80));
        assert_eq!(
            stack_pointer("-1 0x7ffd18ebf000 0x5581c0a1b2c3\n"),
            Some(0x7ffd18ebf000)
        );
        assert_eq!(stack_pointer("running\n"), None);
        assert_eq!(stack_pointer(""), None);
        assert_eq!(stack_pointer("-1 7ffd18ebf000 0x1"), None);
    }
}
