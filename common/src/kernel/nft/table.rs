//! The table as `nft` sees it: its skeleton of chains and set, the batches that change it,
//! and the rules read back from its JSON listing.

use std::borrow::Cow;
use std::collections::HashSet;

use anyhow::{Context, Result};
use nftables::{
    batch::Batch,
    helper::{self, NftablesError},
    schema::{
        Chain, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
    },
    types::{NfChainPolicy, NfChainType, NfHook},
};

use super::names::*;
use super::rules::*;

/// The batch that deletes `stale` (by handle) and adds `wanted`, after making sure the
/// table and chains exist.
pub(super) fn replace_batch(
    stale: &[&InstalledRule],
    wanted: &[RuleKind],
) -> Result<Nftables<'static>> {
    let mut batch = Batch::new();
    add_skeleton(&mut batch);
    for r in stale {
        batch.delete(NfListObject::Rule(handle_rule(r)));
    }
    for w in wanted {
        batch.add(NfListObject::Rule(w.to_rule()?));
    }
    Ok(batch.to_nftables())
}

pub(super) fn handle_rule(r: &InstalledRule) -> Rule<'static> {
    Rule {
        family: FAMILY,
        table: TABLE.into(),
        chain: r.chain.clone().into(),
        expr: Cow::Owned(vec![]),
        handle: Some(r.handle),
        index: None,
        comment: None,
    }
}

pub(super) fn table() -> Table<'static> {
    Table {
        family: FAMILY,
        name: TABLE.into(),
        handle: None,
    }
}

pub(super) fn base_chain(
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

/// `add table` / `add chain` (idempotent in nft).
pub(super) fn add_skeleton(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Table(table()));
    let chains = [
        (
            PREROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Prerouting,
            PREROUTING_PRIORITY,
        ),
        (
            NAT_PREROUTING_CHAIN,
            NfChainType::NAT,
            NfHook::Prerouting,
            NAT_PREROUTING_PRIORITY,
        ),
        (
            POSTROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Postrouting,
            POSTROUTING_PRIORITY,
        ),
        (
            RAW_PREROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Prerouting,
            RAW_PREROUTING_PRIORITY,
        ),
    ];
    for (name, kind, hook, priority) in chains {
        batch.add(NfListObject::Chain(base_chain(name, kind, hook, priority)));
    }
    batch.add(NfListObject::Set(Box::new(Set {
        family: FAMILY,
        table: TABLE.into(),
        name: RETURNING_SET.into(),
        handle: None,
        set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[
            SetType::InetProto,
            SetType::Ipv4Addr,
            SetType::InetService,
            SetType::Ipv4Addr,
            SetType::InetService,
        ])),
        policy: None,
        flags: Some(HashSet::from([SetFlag::Timeout])),
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    })));
}

pub(super) fn remove_table() -> Result<()> {
    // `add` then `delete` in one transaction: deletes the table if present, and is not
    // an error if it is absent.
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    apply(batch.to_nftables()).context("deleting nftables table inet live_migrate")
}

pub(super) fn apply(ruleset: Nftables<'_>) -> Result<()> {
    let mut json = serde_json::to_value(&ruleset)?;
    untangle_notrack(&mut json);
    helper::apply_ruleset_raw(&json.to_string(), helper::DEFAULT_NFT, helper::DEFAULT_ARGS)
        .map(drop)
        .map_err(nft_error)
}

/// The crate writes the `notrack` statement as a bare string, which nft rejects ("expected
/// object"); nft's schema has it as `{"notrack": null}`.
pub(super) fn untangle_notrack(json: &mut serde_json::Value) {
    let commands = json.get_mut("nftables").and_then(|c| c.as_array_mut());
    for command in commands.into_iter().flatten() {
        // `get_mut`, not indexing: indexing a missing key inserts it.
        let statements = command
            .get_mut("add")
            .and_then(|c| c.get_mut("rule"))
            .and_then(|r| r.get_mut("expr"))
            .and_then(|e| e.as_array_mut());
        for statement in statements.into_iter().flatten() {
            if statement == "notrack" {
                *statement = serde_json::json!({ "notrack": null });
            }
        }
    }
}

pub(super) fn nft_error(e: NftablesError) -> anyhow::Error {
    match e {
        NftablesError::NftFailed { hint, stderr, .. } => {
            anyhow::anyhow!("nft failed while {hint}: {}", stderr.trim())
        }
        other => other.into(),
    }
}

/// `nft -j list table inet live_migrate`, parsed as JSON; `None` if there is no table.
/// When nft fails, the list of tables says whether the table is absent (rather than the
/// text of nft's error).
pub(super) fn read_table() -> Result<Option<serde_json::Value>> {
    match helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "table", "inet", TABLE]) {
        Ok(out) => Ok(Some(
            serde_json::from_str(&out).context("parsing the output of nft -j list table")?,
        )),
        Err(_) if !table_listed()? => Ok(None),
        Err(e) => Err(nft_error(e)).context("listing nftables table inet live_migrate"),
    }
}

/// Whether `nft list tables` shows the agent's table.
pub(super) fn table_listed() -> Result<bool> {
    let tables = helper::get_current_ruleset_with_args(helper::DEFAULT_NFT, ["list", "tables"])
        .map_err(nft_error)
        .context("listing nftables tables")?;
    Ok(tables.objects.iter().any(|object| {
        matches!(object, NfObject::ListObject(NfListObject::Table(t)) if t.family == FAMILY && t.name == TABLE)
    }))
}

pub(super) fn list_rules() -> Result<Vec<InstalledRule>> {
    Ok(read_table()?
        .map(|v| rules_from_json(&v))
        .unwrap_or_default())
}

/// The rules of our table in an `nft -j list` document. Only table, chain, handle and
/// comment are read, so expression syntax differences between nft versions do not matter.
pub(super) fn rules_from_json(doc: &serde_json::Value) -> Vec<InstalledRule> {
    let Some(objects) = doc.get("nftables").and_then(|v| v.as_array()) else {
        return vec![];
    };
    objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| {
            r.get("family").and_then(|v| v.as_str()) == Some("inet")
                && r.get("table").and_then(|v| v.as_str()) == Some(TABLE)
        })
        .filter_map(|r| {
            Some(InstalledRule {
                chain: r.get("chain")?.as_str()?.to_owned(),
                handle: u32::try_from(r.get("handle")?.as_u64()?).ok()?,
                kind: RuleKind::from_comment(r.get("comment").and_then(|c| c.as_str())),
            })
        })
        .collect()
}
