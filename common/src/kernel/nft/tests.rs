use super::rules::*;
use super::table::*;
use crate::kernel::conntrack::Proto;
use nftables::batch::Batch;
use serde_json::json;

fn kinds() -> Vec<RuleKind> {
    vec![
        RuleKind::MarkTunnel {
            ifname: "wg-lm0".into(),
            mark: 0x7801,
        },
        RuleKind::RestoreMark {
            ifname: "wg-lm0".into(),
            mark: 0x7801,
        },
        RuleKind::ForwardPort {
            proto: Proto::Udp,
            host_port: 5353,
            container: "10.88.0.5:53".parse().unwrap(),
        },
        RuleKind::DropClash {
            ifname: "wg-lm0".into(),
        },
        RuleKind::UntrackReturning,
        RuleKind::GuardPages {
            server: "10.77.0.11:40000".parse().unwrap(),
            peer: "10.77.0.12".parse().unwrap(),
        },
    ]
}

#[test]
fn comments_round_trip() {
    for k in kinds() {
        let c = k.comment();
        assert!(c.len() < 128, "{c}");
        assert_eq!(RuleKind::from_comment(Some(&c)), k, "{c}");
    }
    assert_eq!(
        RuleKind::from_comment(Some("netavark")),
        RuleKind::Unknown {
            comment: Some("netavark".into())
        }
    );
    assert_eq!(
        RuleKind::from_comment(Some("lm:forward tcp port=1 to=10.0.0.1:2 extra")),
        RuleKind::Unknown {
            comment: Some("lm:forward tcp port=1 to=10.0.0.1:2 extra".into())
        }
    );
    assert_eq!(
        RuleKind::from_comment(None),
        RuleKind::Unknown { comment: None }
    );
}

#[test]
fn rule_json_matches_nft_schema() {
    let [mark, restore, fwd, clash, untrack, guard]: [RuleKind; 6] = kinds().try_into().unwrap();
    let guard = serde_json::to_value(guard.to_rule().unwrap()).unwrap();
    assert_eq!(guard["chain"], "prerouting");
    assert_eq!(
        guard["expr"],
        json!([
            {"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}},
            {"match": {"left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.77.0.11", "op": "=="}},
            {"match": {"left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 40000, "op": "=="}},
            {"match": {"left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.77.0.12", "op": "!="}},
            {"drop": null}
        ])
    );
    let untrack = serde_json::to_value(untrack.to_rule().unwrap()).unwrap();
    assert_eq!(untrack["chain"], "raw_prerouting");
    assert_eq!(
        untrack["expr"],
        json!([
            {"match": {"left": {"meta": {"key": "iifname"}}, "right": "lmwg-*", "op": "=="}},
            {"match": {"left": {"concat": [
                {"meta": {"key": "l4proto"}},
                {"payload": {"protocol": "ip", "field": "saddr"}},
                {"payload": {"protocol": "th", "field": "sport"}},
                {"payload": {"protocol": "ip", "field": "daddr"}},
                {"payload": {"protocol": "th", "field": "dport"}}
            ]}, "right": "@returning_flows", "op": "=="}},
            "notrack"
        ])
    );
    let mut batch = serde_json::json!({"nftables": [{"add": {"rule": untrack}}]});
    untangle_notrack(&mut batch);
    assert_eq!(
        batch["nftables"][0]["add"]["rule"]["expr"][2],
        json!({"notrack": null})
    );
    let clash = serde_json::to_value(clash.to_rule().unwrap()).unwrap();
    assert_eq!(clash["chain"], "postrouting");
    assert_eq!(
        clash["expr"],
        json!([
            {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "=="}},
            {"match": {"left": {"ct": {"key": "state"}}, "right": "new", "op": "in"}},
            {"match": {"left": {"ct": {"key": "status"}}, "right": "snat", "op": "in"}},
            {"drop": null}
        ])
    );
    assert_eq!(
        serde_json::to_value(mark.to_rule().unwrap()).unwrap(),
        json!({
            "family": "inet", "table": "live_migrate", "chain": "prerouting",
            "comment": "lm:mark-tunnel if=wg-lm0 mark=0x7801",
            "expr": [
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "=="}},
                {"match": {"left": {"ct": {"key": "state"}}, "right": "new", "op": "in"}},
                {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 0x7801}}
            ]
        })
    );
    assert_eq!(
        serde_json::to_value(restore.to_rule().unwrap()).unwrap()["expr"],
        json!([
            {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "!="}},
            {"match": {"left": {"ct": {"key": "mark"}}, "right": 0x7801, "op": "=="}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}
        ])
    );
    let fwd = serde_json::to_value(fwd.to_rule().unwrap()).unwrap();
    assert_eq!(fwd["chain"], "nat_prerouting");
    assert_eq!(
        fwd["expr"],
        json!([
            {"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}},
            {"match": {"left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local", "op": "=="}},
            {"match": {"left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5353, "op": "=="}},
            {"dnat": {"addr": "10.88.0.5", "family": "ip", "port": 53}}
        ])
    );
}

#[test]
fn skeleton_json() {
    let mut batch = Batch::new();
    add_skeleton(&mut batch);
    let v = serde_json::to_value(batch.to_nftables()).unwrap();
    assert_eq!(
        v["nftables"][1]["add"]["chain"],
        json!({"family": "inet", "table": "live_migrate", "name": "prerouting",
               "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"})
    );
    assert_eq!(v["nftables"][2]["add"]["chain"]["type"], "nat");
    assert_eq!(v["nftables"][2]["add"]["chain"]["prio"], -110);
    assert_eq!(v["nftables"][3]["add"]["chain"]["hook"], "postrouting");
    assert_eq!(v["nftables"][3]["add"]["chain"]["prio"], 110);
}

#[test]
fn replace_batch_deletes_by_handle_then_adds() {
    let stale = InstalledRule {
        chain: "nat_prerouting".into(),
        handle: 42,
        kind: RuleKind::ForwardPort {
            proto: Proto::Udp,
            host_port: 5353,
            container: "10.88.0.9:53".parse().unwrap(),
        },
    };
    let wanted = kinds()[2].clone();
    assert!(wanted.same_key(&stale.kind));
    let v = serde_json::to_value(replace_batch(&[&stale], &[wanted]).unwrap()).unwrap();
    let cmds = v["nftables"].as_array().unwrap();
    assert_eq!(cmds.len(), 8);
    assert_eq!(
        cmds[6]["delete"]["rule"],
        json!({"family": "inet", "table": "live_migrate", "chain": "nat_prerouting",
               "expr": [], "handle": 42})
    );
    assert_eq!(
        cmds[7]["add"]["rule"]["comment"],
        "lm:forward udp port=5353 to=10.88.0.5:53"
    );
}

#[test]
fn rules_are_read_from_nft_json() {
    let doc = json!({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "live_migrate", "handle": 7}},
        {"chain": {"family": "inet", "table": "live_migrate", "name": "prerouting", "handle": 1}},
        {"rule": {"family": "inet", "table": "live_migrate", "chain": "prerouting", "handle": 4,
                  "comment": "lm:mark-tunnel if=wg0 mark=0x7801", "expr": []}},
        {"rule": {"family": "inet", "table": "live_migrate", "chain": "prerouting", "handle": 5,
                  "expr": []}},
        {"rule": {"family": "inet", "table": "other", "chain": "x", "handle": 6,
                  "comment": "lm:mark-tunnel if=wg1 mark=0x1", "expr": []}}
    ]});
    let rules = rules_from_json(&doc);
    assert_eq!(
        rules,
        vec![
            InstalledRule {
                chain: "prerouting".into(),
                handle: 4,
                kind: RuleKind::MarkTunnel {
                    ifname: "wg0".into(),
                    mark: 0x7801
                }
            },
            InstalledRule {
                chain: "prerouting".into(),
                handle: 5,
                kind: RuleKind::Unknown { comment: None }
            },
        ]
    );
    let status = serde_json::to_value(&rules[0]).unwrap();
    assert_eq!(
        status,
        json!({"chain": "prerouting", "handle": 4, "kind": "mark_tunnel", "ifname": "wg0", "mark": 0x7801})
    );
}

#[test]
fn interface_names_are_checked() {
    assert!(check_ifname("wg0").is_ok());
    assert!(check_ifname("").is_err());
    assert!(check_ifname("a-very-long-ifname").is_err());
    assert!(check_ifname("wg0\" accept").is_err());
}
