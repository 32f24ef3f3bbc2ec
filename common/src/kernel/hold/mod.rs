//! Holding a frozen container's packets on the source instead of dropping them.
//!
//! While a container is checkpointed, moved and restored, its clients keep sending. Dropped
//! packets make TCP back off (200, 400, 800 ms, ...), so a client would pause well beyond
//! the freeze. Instead, from the checkpoint on, a rule queues every packet for the
//! container's address to this process (nfqueue), which keeps the kernel's verdict
//! pending: the packets wait in the kernel, in order. Once the destination runs the
//! container and its address is routed into the tunnel, they are accepted in one batch
//! and go on through routing, as if they had just arrived: to the destination, or to the
//! container here again after a rollback.
//!
//! Both hosts [`arm`] their hold ahead of the freeze: its rule is in place, but the
//! packets go on through routing as they come until [`hold_back`], which needs no
//! nftables commit (a commit takes 10 ms or more, which the freeze would otherwise pay).
//! [`hold_back`] returns once the verdicts of the packets let through before it are given,
//! so that none of them meets a route changed after it (the blackhole of the freeze).
//! The source arms it just before the freeze, the destination when the migration begins.
//!
//! The rule lives in a table of its own, `ip live_migrate_hold`, with one base chain
//! (prerouting, priority -50: after the DNAT of published ports, so that their packets
//! carry the container's address). The queue target is xtables' `NFQUEUE` through
//! nftables' compat expression: this kernel has no native nft `queue`, and the `nft`
//! tool cannot write compat expressions, so the rules are written over netlink
//! ([`rule`]). Each rule carries the comment `lm:hold <ip>`, by which it is found and
//! deleted. The queue's own protocol (binding, notifications, verdicts) is in [`nfqueue`].
//!
//! The queue is bounded ([`DEFAULT_BOUND`] packets unless configured): the kernel drops
//! what overflows and counts it, and [`HoldReport`] says how many. If the holding process
//! dies, the kernel drops the packets it held; the rule, without a listener, drops new
//! ones (as the blackhole route does) until [`release`] in the process that resolves the
//! migration removes it.
//!
//! Deleting a base chain flushes every nfqueue of its network namespace, so the chain is
//! never deleted while a hold may be live; rules come and go, the chain stays.
//!
//! Each hold answers the kernel from a thread of its own at real-time priority
//! (`run_before_others`): when the rule goes, a packet that met it just before must get
//! its verdict before newer ones, which no longer meet it, overtake it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netlink_sys::{AsyncSocketExt, TokioSocket};
use tokio::sync::oneshot;

use crate::protocol::HoldReport;
use nfqueue::{accept_up_to, bind_queue, note_packets, note_pending, queue_state, Held};
use rule::{install_rule, remove_rule, remove_rules};

mod nfqueue;
mod rule;

/// Packets held per container unless configured: 2 s at 10,000 packets/s.
pub const DEFAULT_BOUND: u32 = 20_000;

/// Holds of this process, by container address: [`release`] lets their packets through.
static LIVE: Mutex<BTreeMap<Ipv4Addr, Live>> = Mutex::new(BTreeMap::new());

struct Live {
    release: oneshot::Sender<Release>,
    /// Asks an [`arm`]ed hold, which still lets every packet through as it comes, to hold
    /// them from now on; `None` once asked.
    hold_back: Option<oneshot::Sender<HeldBack>>,
}

/// Asks a hold's task to let its packets through: it says when the held ones are on their
/// way, and reports once the rule is gone and every packet through.
struct Release {
    held_through: oneshot::Sender<()>,
    report: oneshot::Sender<Result<HoldReport>>,
}
/// Answered by a hold's task once it holds every packet it has not let through yet.
type HeldBack = oneshot::Sender<()>;

/// Starts holding packets for `ip`, at most `bound` at a time; with `except_from`, not
/// those that arrive through that interface.
pub async fn start(ip: Ipv4Addr, bound: u32, except_from: Option<&str>) -> Result<()> {
    queue_packets(ip, bound, except_from, true).await
}

/// Like [`start`], but the packets go on through routing as they come until [`hold_back`]:
/// the nftables commit of the rule happens now, and holding then costs no kernel change.
pub async fn arm(ip: Ipv4Addr, bound: u32, except_from: Option<&str>) -> Result<()> {
    queue_packets(ip, bound, except_from, false).await
}

/// Packets for `ip` that meet its [`arm`]ed hold are held from now on. False if this
/// process has no hold on `ip`. Returns once no packet's verdict is on its way any more:
/// one the hold let through after this returned could meet a route changed meanwhile.
pub async fn hold_back(ip: Ipv4Addr) -> bool {
    let ask = LIVE
        .lock()
        .expect("hold registry poisoned")
        .get_mut(&ip)
        .map(|hold| hold.hold_back.take());
    match ask {
        None => false,
        // Held already.
        Some(None) => true,
        Some(Some(ask)) => {
            let (answer, answered) = oneshot::channel();
            ask.send(answer).is_ok() && answered.await.is_ok()
        }
    }
}

async fn queue_packets(
    ip: Ipv4Addr,
    bound: u32,
    except_from: Option<&str>,
    holding: bool,
) -> Result<()> {
    // A rule left by a hold that was never released would come first and, without its
    // listener, drop the packets.
    release(ip).await?;
    let except_from = except_from.map(str::to_owned);
    let (ready, is_ready) = oneshot::channel();
    // The rule's removal at the release runs here: its commit blocks the thread that sends
    // it, and the hold's thread must keep answering meanwhile.
    let commits = tokio::runtime::Handle::current();
    // A thread of its own (it inherits this one's network namespace), ahead of every
    // ordinary one: see [`run_before_others`].
    std::thread::Builder::new()
        .name(format!("hold {ip}"))
        .spawn(move || {
            run_before_others();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    runtime.block_on(run_hold(ip, bound, except_from, holding, commits, ready))
                }
                Err(e) => drop(ready.send(Err(e.into()))),
            }
        })
        .context("starting a hold's thread")?;
    is_ready.await.context("the hold's thread ended")?
}

/// Real-time priority for the calling thread, so that a hold answers the kernel within
/// microseconds on a busy host. At the release, packets that meet the rule while it goes
/// wait for their verdict, and newer ones, which no longer meet it, overtake them: on 2
/// busy cores an ordinary thread answered 0.2-3 ms late, and 1-20 datagrams of a flow at
/// 6,250/s came out of order. Without the right to (no CAP_SYS_NICE, or a cgroup without a
/// real-time budget) it stays as it is. The thread waits on its socket between packets.
fn run_before_others() {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, RealtimeThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };
    let fifo = ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, fifo) {
        tracing::debug!("a hold's thread keeps its ordinary priority: {e:?}");
    }
}

/// Binds the queue and installs the rule, says so on `ready`, then holds until released.
async fn run_hold(
    ip: Ipv4Addr,
    bound: u32,
    except_from: Option<String>,
    holding: bool,
    commits: tokio::runtime::Handle,
    ready: oneshot::Sender<Result<()>>,
) {
    let set_up = async {
        let (socket, queue) = bind_queue(bound).await?;
        let rule = install_rule(ip, queue, except_from.as_deref())
            .await
            .with_context(|| format!("installing the hold rule for {ip}"))?;
        let hold = Queue {
            queue,
            ip,
            rule,
            bound,
        };
        anyhow::Ok((socket, hold))
    };
    let (mut socket, hold) = match set_up.await {
        Ok(set_up) => set_up,
        Err(e) => return drop(ready.send(Err(e))),
    };
    let (release, released) = oneshot::channel();
    let (ask, asked) = oneshot::channel();
    let passing = !holding;
    LIVE.lock().expect("hold registry poisoned").insert(
        ip,
        Live {
            release,
            hold_back: passing.then_some(ask),
        },
    );
    let _ = ready.send(Ok(()));
    let held = hold_packets(&mut socket, hold.queue, passing.then_some(asked), released).await;
    if let Some((
        held,
        Release {
            held_through,
            report,
        },
    )) = held
    {
        let _ = report.send(let_through(&mut socket, &hold, held, held_through, &commits).await);
    }
}

/// Ends the hold on `ip`: this process's held packets go on through routing (so route the
/// address where it belongs first), and the rule goes. Without a hold of this process
/// (it died, or none was started) only the rule, if any, is removed. Idempotent.
pub async fn release(ip: Ipv4Addr) -> Result<Option<HoldReport>> {
    start_release(ip).finish().await
}

/// Starts [`release`]: [`Releasing::held_through`] says when the held packets are on their
/// way, [`Releasing::finish`] when the rule is gone too.
pub fn start_release(ip: Ipv4Addr) -> Releasing {
    let live = LIVE.lock().expect("hold registry poisoned").remove(&ip);
    let mut releasing = Releasing {
        ip,
        held_through: None,
        report: None,
    };
    if let Some(live) = live {
        let (held_through, on_their_way) = oneshot::channel();
        let (report, reported) = oneshot::channel();
        if live
            .release
            .send(Release {
                held_through,
                report,
            })
            .is_ok()
        {
            releasing.held_through = Some(on_their_way);
            releasing.report = Some(reported);
        }
    }
    releasing
}

/// A [`release`] under way.
pub struct Releasing {
    ip: Ipv4Addr,
    held_through: Option<oneshot::Receiver<()>>,
    report: Option<oneshot::Receiver<Result<HoldReport>>>,
}

impl Releasing {
    /// Returns once the packets held so far are on their way; those that meet the rule
    /// until it is gone follow as they come, in order. At once without a live hold.
    pub async fn held_through(&mut self) {
        if let Some(on_their_way) = self.held_through.take() {
            let _ = on_their_way.await;
        }
    }

    /// Returns once the rule is gone and every packet is through, with what the hold did.
    pub async fn finish(mut self) -> Result<Option<HoldReport>> {
        if let Some(reported) = self.report.take() {
            if let Ok(report) = reported.await {
                return report.map(Some);
            }
        }
        remove_rules(self.ip).await?;
        Ok(None)
    }
}

/// How long the release waits for the packets that met the rule before it went.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes note of the queue's packets until asked to let them through; while `passing`
/// (until asked on it to hold back), lets them through as they come. `None` if the asker
/// went away (the process is ending: the kernel drops the packets with the socket).
async fn hold_packets(
    socket: &mut TokioSocket,
    queue: u16,
    mut passing: Option<oneshot::Receiver<HeldBack>>,
    mut released: oneshot::Receiver<Release>,
) -> Option<(Held, Release)> {
    let mut held = Held::default();
    loop {
        // One thing at a time: the answer to "hold back" goes out only after the verdict of
        // every packet passed before it.
        let hold_back = async {
            match passing.as_mut() {
                Some(asked) => asked.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reply = &mut released => return reply.ok().map(|reply| (held, reply)),
            asked = hold_back => {
                passing = None;
                if let Ok(answer) = asked {
                    let _ = answer.send(());
                }
            }
            received = socket.recv_from_full() => match received {
                Ok((data, _)) if passing.is_none() => note_packets(&data, &mut held, true),
                Ok((data, _)) => {
                    // A packet whose verdict fails here stays queued until the release's
                    // batch.
                    note_packets(&data, &mut held, false);
                    if let Some(last) = held.last_id {
                        if let Err(e) = accept_up_to(socket, queue, last).await {
                            tracing::debug!("nfqueue verdict: {e:#}");
                        }
                    }
                }
                // ENOBUFS: notifications were lost; the kernel dropped and counted those
                // packets.
                Err(e) => tracing::debug!("nfqueue receive: {e}"),
            },
        }
    }
}

/// One live hold.
#[derive(Clone, Copy)]
struct Queue {
    queue: u16,
    ip: Ipv4Addr,
    /// The handle of its rule.
    rule: u64,
    bound: u32,
}

/// Lets the held packets through, removes the rule (letting through, as they come, the
/// packets that meet it meanwhile), then lets through what was still queued, until the
/// kernel holds nothing for this queue. The rule goes by its handle, in one request, to
/// keep that window short.
async fn let_through(
    socket: &mut TokioSocket,
    hold: &Queue,
    mut held: Held,
    held_through: oneshot::Sender<()>,
    commits: &tokio::runtime::Handle,
) -> Result<HoldReport> {
    let Queue {
        queue,
        ip,
        rule,
        bound,
    } = *hold;
    // Notifications still unread name packets queued already: they go in the first batch,
    // or they would come after packets that no longer meet the rule.
    note_pending(socket, &mut held).await;
    if let Some(last) = held.last_id {
        accept_up_to(socket, queue, last).await?;
    }
    let _ = held_through.send(());
    // Removing the rule is an nftables commit, which can take tens of milliseconds: the
    // packets that still meet it meanwhile are let through as they come, so that none waits
    // in the queue while a newer one, that no longer meets the rule, overtakes it. The
    // kernel commits within the netlink send, which blocks its thread: another thread
    // sends it, and this one keeps answering meanwhile.
    let mut removing = commits.spawn(remove_rule(ip, rule));
    loop {
        let received = tokio::select! {
            removed = &mut removing => {
                removed??;
                break;
            }
            received = socket.recv_from_full() => received,
        };
        if let Ok((data, _)) = received {
            note_packets(&data, &mut held, true);
            if let Some(last) = held.last_id {
                accept_up_to(socket, queue, last).await?;
            }
        }
    }
    // Packets that met the rule before it went: their notifications are on the way.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        note_pending(socket, &mut held).await;
        if let Some(last) = held.last_id {
            accept_up_to(socket, queue, last).await?;
        }
        let state = queue_state(queue)?;
        if state.waiting == 0 {
            return Ok(HoldReport {
                held: held.count,
                dropped: state.dropped,
                bound,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "the kernel still holds {} packets of nfqueue {queue} for {ip}",
                state.waiting
            );
        }
        if let Ok(Ok((data, _))) =
            tokio::time::timeout(Duration::from_millis(20), socket.recv_from_full()).await
        {
            note_packets(&data, &mut held, true);
        }
    }
}
