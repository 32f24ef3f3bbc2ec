//! The drain's plan: where each container goes, by the preflight and the destinations'
//! free memory, and the plan with its results as JSON.

use anyhow::Result;
use serde::Serialize;

/// One container of the plan: where it goes, or why it stays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub container: String,
    pub memory_bytes: Option<u64>,
    pub destination: Option<String>,
    /// Why no destination takes it: each destination's problems.
    pub reason: Option<String>,
}

/// What became of one container.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub container: String,
    pub destination: Option<String>,
    pub moved: bool,
    pub freeze_to_resume_ms: Option<f64>,
    /// What went wrong, with what became of the container (a failed migration says
    /// where it runs, or that it is in doubt).
    pub error: Option<String>,
}

#[derive(Serialize)]
struct DrainJson<'a> {
    plan: &'a [Placement],
    /// Absent with `--dry-run`.
    results: Option<&'a [Moved]>,
}

/// What the preflight of one container found at one destination.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub destination: String,
    /// The destination's available memory, or its problems for this container.
    pub verdict: Result<u64, String>,
}

/// The plan: the largest containers first, each to the passing destination with the
/// most memory left once what the plan already sends there is counted.
pub fn place(mut checked: Vec<(String, Option<u64>, Vec<Candidate>)>) -> Vec<Placement> {
    checked.sort_by_key(|(_, memory, _)| std::cmp::Reverse(memory.unwrap_or(0)));
    let mut promised: Vec<(String, u64)> = Vec::new();
    let mut placements = Vec::new();
    for (container, memory_bytes, candidates) in checked {
        let left = |c: &Candidate| {
            let promised = promised
                .iter()
                .filter(|(d, _)| *d == c.destination)
                .map(|(_, m)| m)
                .sum::<u64>();
            c.verdict.as_ref().ok().map(|a| a.saturating_sub(promised))
        };
        // The first listed wins a tie.
        let best = candidates
            .iter()
            .filter_map(|c| left(c).map(|l| (c, l)))
            .fold(None::<(&Candidate, u64)>, |best, (c, l)| match best {
                Some((_, b)) if b >= l => best,
                _ => Some((c, l)),
            });
        let placement = match best {
            Some((c, _)) => {
                promised.push((c.destination.clone(), memory_bytes.unwrap_or(0)));
                Placement {
                    container,
                    memory_bytes,
                    destination: Some(c.destination.clone()),
                    reason: None,
                }
            }
            None => Placement {
                container,
                memory_bytes,
                destination: None,
                reason: Some(
                    candidates
                        .iter()
                        .filter_map(|c| {
                            let problems = c.verdict.as_ref().err()?;
                            Some(format!("{}: {problems}", c.destination))
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            },
        };
        placements.push(placement);
    }
    placements
}

pub fn json<'a>(plan: &'a [Placement], results: Option<&'a [Moved]>) -> impl Serialize + 'a {
    DrainJson { plan, results }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(destination: &str, available: u64) -> Candidate {
        Candidate {
            destination: destination.into(),
            verdict: Ok(available),
        }
    }

    fn refused(destination: &str, why: &str) -> Candidate {
        Candidate {
            destination: destination.into(),
            verdict: Err(why.into()),
        }
    }

    /// The largest goes first to the roomiest; what it takes counts for the next.
    #[test]
    fn plan_spreads_by_memory_left() {
        let plan = place(vec![
            (
                "small".into(),
                Some(1 << 30),
                vec![ok("h2", 10 << 30), ok("h3", 8 << 30)],
            ),
            (
                "big".into(),
                Some(4 << 30),
                vec![ok("h2", 10 << 30), ok("h3", 8 << 30)],
            ),
        ]);
        let placed: Vec<(&str, Option<&str>)> = plan
            .iter()
            .map(|p| (p.container.as_str(), p.destination.as_deref()))
            .collect();
        // big: h2 (10 > 8); small: h3 (8 > 10 - 4).
        assert_eq!(placed, [("big", Some("h2")), ("small", Some("h3"))]);
    }

    #[test]
    fn plan_skips_refusing_destinations_and_keeps_the_unplaceable_with_reasons() {
        let plan = place(vec![
            (
                "web".into(),
                Some(1 << 20),
                vec![refused("h2", "ports in use"), ok("h3", 1 << 30)],
            ),
            (
                "stuck".into(),
                Some(1 << 20),
                vec![
                    refused("h2", "ports in use"),
                    refused("h3", "address in use"),
                ],
            ),
        ]);
        assert_eq!(plan[0].destination.as_deref(), Some("h3"));
        assert_eq!(plan[1].destination, None);
        assert_eq!(
            plan[1].reason.as_deref(),
            Some("h2: ports in use; h3: address in use")
        );
    }

    #[test]
    fn plan_breaks_ties_in_the_listed_order() {
        let plan = place(vec![("c".into(), None, vec![ok("h2", 5), ok("h3", 5)])]);
        assert_eq!(plan[0].destination.as_deref(), Some("h2"));
    }
}
