//! `common::engine::lazy_pages::refreeze_off_aligned_stacks` on real frozen processes:
//! a small C program (built here with gcc) spins with its stack pointer on a page
//! boundary, or alternately on and off it, in a freezer cgroup of its own
//! (`lm-stacks-<pid>-<tag>`, removed with the process even when an assertion fails).
//! Runs only as root, on x86_64, with gcc, and when `LM_LAB_SKIP` is unset; otherwise its
//! tests are reported as ignored, and it says why.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::engine::lazy_pages::refreeze_off_aligned_stacks;
use common::kernel::freezer;

#[path = "support/contained.rs"]
mod contained;
mod support;

use contained::Contained;

fn main() {
    support::run_tests(
        support::skip_reason().or_else(unsupported),
        &[
            (
                "a_stack_pointer_that_leaves_the_page_boundary_is_refrozen_off_it",
                a_stack_pointer_that_leaves_the_page_boundary_is_refrozen_off_it,
            ),
            (
                "a_stack_pointer_that_stays_on_the_page_boundary_is_reported",
                a_stack_pointer_that_stays_on_the_page_boundary_is_reported,
            ),
        ],
    )
}

fn unsupported() -> Option<String> {
    if !cfg!(target_arch = "x86_64") {
        return Some("the spinning program is x86_64 assembly".into());
    }
    if Command::new("gcc").arg("--version").output().is_err() {
        return Some("gcc is missing (it builds the spinning program)".into());
    }
    None
}

/// Spins with its stack pointer on a page boundary; with an argument, for about a
/// millisecond on it and then one off it, over and over.
const SPIN_C: &str = r#"
static char stack[4 * 4096] __attribute__((aligned(4096)));
int main(int argc, char **argv) {
    (void)argv;
    unsigned long aligned = (unsigned long)stack + 3 * 4096;
    unsigned long alternate = argc > 1;
    __asm__ volatile(
        "1: mov %0, %%rsp\n"
        "mov $2000000, %%ecx\n"
        "2: dec %%ecx\n"
        "jnz 2b\n"
        "test %1, %1\n"
        "jz 1b\n"
        "sub $64, %%rsp\n"
        "mov $2000000, %%ecx\n"
        "3: dec %%ecx\n"
        "jnz 3b\n"
        "jmp 1b\n"
        :
        : "r"(aligned), "r"(alternate)
        : "ecx", "memory");
    return 0;
}
"#;

const PAGE: u64 = 4096;

/// The spinning process in its own freezer cgroup; killed, and the cgroup removed, on drop.
struct Spinner {
    contained: Contained,
    build: PathBuf,
}

impl Spinner {
    fn start(tag: &str, alternate: bool) -> Spinner {
        let name = format!("lm-stacks-{}-{tag}", std::process::id());
        let build = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&build).unwrap();
        let source = build.join("spin.c");
        std::fs::write(&source, SPIN_C).unwrap();
        let program = build.join("spin");
        let built = Command::new("gcc")
            .arg("-O0")
            .arg("-o")
            .arg(&program)
            .arg(&source)
            .status()
            .unwrap();
        assert!(built.success(), "gcc failed to build {}", source.display());
        let mut command = Command::new(&program);
        if alternate {
            command.arg("alternate");
        }
        Spinner {
            contained: Contained::spawn(&name, &mut command),
            build,
        }
    }

    /// Its stack pointer while frozen (`/proc/<pid>/syscall`: `-1 sp pc` in user mode).
    fn stack_pointer(&self) -> u64 {
        let line = std::fs::read_to_string(format!("/proc/{}/syscall", self.contained.child.id()))
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 3, "not stopped: {line:?}");
        u64::from_str_radix(fields[fields.len() - 2].trim_start_matches("0x"), 16).unwrap()
    }

    /// Freezes it, over and over, until it is frozen with its stack pointer on a page
    /// boundary.
    fn freeze_on_the_boundary(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            freezer::freeze(&self.contained.cgroup).unwrap();
            if self.stack_pointer().is_multiple_of(PAGE) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never frozen on the page boundary"
            );
            freezer::thaw(&self.contained.cgroup).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.build);
    }
}

fn a_stack_pointer_that_leaves_the_page_boundary_is_refrozen_off_it() {
    let spinner = Spinner::start("leaves", true);
    spinner.freeze_on_the_boundary();
    let refrozen = refreeze_off_aligned_stacks(&spinner.contained.cgroup).unwrap();
    assert!(refrozen.times >= 1, "it was on the boundary: refrozen");
    assert_eq!(refrozen.costly, None);
    assert!(
        !spinner.stack_pointer().is_multiple_of(PAGE),
        "frozen off the boundary"
    );
}

fn a_stack_pointer_that_stays_on_the_page_boundary_is_reported() {
    let spinner = Spinner::start("stays", false);
    spinner.freeze_on_the_boundary();
    let refrozen = refreeze_off_aligned_stacks(&spinner.contained.cgroup).unwrap();
    assert!(refrozen.times > 1, "tried more than once");
    let costly = refrozen.costly.expect("the freeze's cost is reported");
    assert!(costly.contains("page-aligned"), "{costly}");
    assert!(spinner.stack_pointer().is_multiple_of(PAGE));
}
