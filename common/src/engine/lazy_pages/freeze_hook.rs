//! The freeze starts where CRIU's own work does: CRIU runs the configuration's
//! `action-script` for each of its actions, `pre-dump` first, just before it stops the
//! processes; until then podman's call has spent 25-40 ms on version checks and starting
//! runc and CRIU, with the container still running. The script is `agent-client` itself,
//! through a link named `<migration>.criu-hook`: it asks the migration, over the unix
//! socket beside the link, whether this dump may go on, and CRIU waits for the answer.
//! The migration holds the container's packets and freezes its cgroup, then answers.
//!
//! The exchange: the hook sends the PID CRIU dumps (`CRTOOLS_INIT_PID`) and a newline; the
//! migration answers one byte, `PROCEED` or, for a dump that is not its container's
//! (another checkpoint on this host while the configuration is there), `NOT_OURS`. Any
//! other outcome (no socket, no answer) fails the hook, and with it CRIU's dump: the
//! container runs on, and the migration fails before its freeze.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// The end of the link's name: how `agent-client` knows CRIU started it as its hook.
const LINK_SUFFIX: &str = ".criu-hook";
/// The socket beside the link: the link's path with this appended.
const SOCKET_SUFFIX: &str = ".sock";
/// The dump may go on: it is the migration's, its packets are held and its cgroup frozen.
const PROCEED: u8 = b'y';
/// The dump is another container's: the hook lets it go on untouched.
const NOT_OURS: u8 = b'n';
/// How long the hook waits for the migration's answer before it fails CRIU's dump.
const ANSWER_PATIENCE: Duration = Duration::from_secs(60);

/// The migration's end: the link CRIU runs and the socket its hook calls.
pub struct FreezeHook {
    link: PathBuf,
    listener: UnixListener,
}

/// A `pre-dump` of the migration's container, waiting for [`PreDump::proceed`].
pub struct PreDump {
    stream: tokio::net::UnixStream,
    /// The CRIU process that runs the hook: it dumps the container, then serves its pages.
    pub criu: Option<i32>,
}

impl FreezeHook {
    /// The paths [`FreezeHook::create`] makes for migration `id` in `work_dir`, for the
    /// journal to remove them whatever happens.
    pub fn paths(work_dir: &Path, id: &str) -> [PathBuf; 2] {
        let link = work_dir.join(format!("{id}{LINK_SUFFIX}"));
        let socket = socket_of(&link);
        [link, socket]
    }

    /// Links this program as the hook of migration `id` and listens for it.
    pub fn create(work_dir: &Path, id: &str) -> Result<FreezeHook> {
        let [link, socket] = Self::paths(work_dir, id);
        let program = std::env::current_exe().context("find this program for CRIU's hook")?;
        crate::files::remove_if_present(&link)?;
        std::os::unix::fs::symlink(&program, &link)
            .with_context(|| format!("link {} to {}", link.display(), program.display()))?;
        crate::files::remove_if_present(&socket)?;
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listen on {}", socket.display()))?;
        Ok(FreezeHook { link, listener })
    }

    /// What CRIU's `action-script` option names.
    pub fn script(&self) -> &Path {
        &self.link
    }

    /// Waits for the hook of the dump of PID `init`; another dump's hook is let go.
    pub async fn pre_dump(&self, init: i32) -> Result<PreDump> {
        loop {
            let (mut stream, _) = self.listener.accept().await?;
            let mut line = String::new();
            tokio::io::BufReader::new(&mut stream)
                .read_line(&mut line)
                .await?;
            if line.trim().parse::<i32>().ok() == Some(init) {
                // The hook waits for the answer, so its parent is still the CRIU that ran it.
                let hook = stream.peer_cred()?.pid();
                let criu = hook.and_then(crate::kernel::process::parent);
                return Ok(PreDump { stream, criu });
            }
            tracing::warn!(
                "CRIU dumps PID {} on this host during the migration's checkpoint",
                line.trim()
            );
            stream.write_all(&[NOT_OURS]).await?;
        }
    }
}

impl PreDump {
    /// CRIU may stop the processes: the container's packets are held and it is frozen.
    pub async fn proceed(mut self) -> Result<()> {
        self.stream
            .write_all(&[PROCEED])
            .await
            .context("answer CRIU's pre-dump hook")
    }
}

fn socket_of(link: &Path) -> PathBuf {
    let mut socket = link.as_os_str().to_owned();
    socket.push(SOCKET_SUFFIX);
    PathBuf::from(socket)
}

/// `Some` exit code if CRIU started this program as a migration's hook (the
/// `CRTOOLS_SCRIPT_ACTION` it sets, and the link's name); the caller returns it at once.
/// Every action but `pre-dump` passes straight through: some of them are in the freeze.
pub fn run_if_invoked() -> Option<ExitCode> {
    let action = std::env::var_os("CRTOOLS_SCRIPT_ACTION")?;
    let link = PathBuf::from(std::env::args_os().next()?);
    if !link.as_os_str().to_string_lossy().ends_with(LINK_SUFFIX) {
        return None;
    }
    if action != "pre-dump" {
        return Some(ExitCode::SUCCESS);
    }
    let asked = std::env::var("CRTOOLS_INIT_PID")
        .context("CRIU named no PID")
        .and_then(|pid| ask(&link, &pid));
    Some(match asked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // CRIU logs the failed script; its caller sees the dump fail.
            eprintln!("live-migrate CRIU hook: {e:#}");
            ExitCode::FAILURE
        }
    })
}

/// The hook's side of the exchange, for the dump of `pid`.
fn ask(link: &Path, pid: &str) -> Result<()> {
    let socket = socket_of(link);
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("reach the migration at {}", socket.display()))?;
    stream.set_read_timeout(Some(ANSWER_PATIENCE))?;
    stream.write_all(format!("{pid}\n").as_bytes())?;
    let mut answer = [0u8];
    BufReader::new(&stream)
        .read_exact(&mut answer)
        .context("no answer from the migration")?;
    match answer[0] {
        PROCEED | NOT_OURS => Ok(()),
        other => bail!("unknown answer {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hook_waits_for_its_dump_and_lets_another_go() {
        let dir = tempfile::tempdir().unwrap();
        let hook = FreezeHook::create(dir.path(), "m1").unwrap();
        assert!(hook.script().ends_with("m1.criu-hook"));
        let socket = socket_of(hook.script());
        let ask_for = |pid: i32| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(socket).unwrap();
                s.write_all(format!("{pid}\n").as_bytes()).unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                line
            })
        };
        let waiting = tokio::spawn(async move {
            let pre_dump = hook.pre_dump(42).await;
            (hook, pre_dump)
        });
        let other = ask_for(7);
        assert_eq!(other.join().unwrap(), "n");
        let ours = ask_for(42);
        let (_hook, pre_dump) = waiting.await.unwrap();
        assert!(!ours.is_finished(), "answered before the freeze");
        let pre_dump = pre_dump.unwrap();
        // The "hook" is a thread of this test: its process's parent.
        let parent = nix::unistd::getppid().as_raw();
        assert_eq!(pre_dump.criu, Some(parent));
        pre_dump.proceed().await.unwrap();
        assert_eq!(ours.join().unwrap(), "y");
    }

    #[test]
    fn a_hook_without_an_answer_fails_the_dump() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("m2.criu-hook");
        // Nobody listens: the migration is gone.
        assert!(ask(&link, "42").is_err());
        // The migration closes without answering (it died before the freeze).
        let listener = std::os::unix::net::UnixListener::bind(socket_of(&link)).unwrap();
        let closing = std::thread::spawn(move || drop(listener.accept().unwrap()));
        assert!(ask(&link, "42").is_err());
        closing.join().unwrap();
    }
}
