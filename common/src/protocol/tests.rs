use super::*;

#[test]
fn messages_are_tagged_json() {
    let m = ClientMessage::PutImage {
        image_id: "abc".into(),
    };
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, r#"{"type":"put_image","image_id":"abc"}"#);
    assert_eq!(serde_json::from_str::<ClientMessage>(&json).unwrap(), m);
}

#[test]
fn unknown_message_type_is_rejected() {
    assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"rm_rf"}"#).is_err());
}

#[test]
fn server_report_roundtrips() {
    let m = ServerMessage::Preflight(Box::new(HostReport {
        hostname: "h2".into(),
        podman_version: "5.4.2".into(),
        criu: CriuVersion::Installed("4.2.1".into()),
        criu_check_problem: None,
        criu_features: vec![("mem_dirty_track".into(), false)],
        post_copy_problem: None,
        oci_runtime: "runc".into(),
        free_state_bytes: 1 << 30,
        memory_available_bytes: 1 << 30,
        has_image: false,
        conflicting_container: Some("counter".into()),
        address_in_use_by: None,
        ports_in_use: vec![PortInUse {
            protocol: Proto::Tcp,
            host_port: 8080,
            container: "web".into(),
        }],
    }));
    let json = serde_json::to_vec(&m).unwrap();
    assert_eq!(serde_json::from_slice::<ServerMessage>(&json).unwrap(), m);
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn without_nat_gives_the_container_view() {
    let dnat = Flow {
        proto: Proto::Tcp,
        orig: Tuple::new(sa("192.168.1.9:40000"), sa("192.168.1.2:8080")),
        reply: Tuple::new(sa("10.88.0.5:80"), sa("192.168.1.9:40000")),
        mark: 7,
        tcp_state: Some(3),
        timeout: None,
    };
    assert!(dnat.is_nat());
    let plain = dnat.without_nat();
    assert!(!plain.is_nat());
    assert_eq!(
        plain.orig,
        Tuple::new(sa("192.168.1.9:40000"), sa("10.88.0.5:80"))
    );
    assert_eq!(plain.mark, 7);
    let snat = Flow {
        proto: Proto::Udp,
        orig: Tuple::new(sa("10.88.0.5:5353"), sa("1.1.1.1:53")),
        reply: Tuple::new(sa("1.1.1.1:53"), sa("192.168.1.2:5353")),
        mark: 0,
        tcp_state: None,
        timeout: None,
    };
    assert_eq!(
        snat.without_nat().reply,
        Tuple::new(sa("1.1.1.1:53"), sa("10.88.0.5:5353"))
    );
    let direct = Flow::udp(sa("1.2.3.4:1"), sa("5.6.7.8:2"));
    assert_eq!(direct.without_nat(), direct);
}

#[test]
fn flow_serde_round_trip() {
    let f = Flow::tcp(sa("10.1.1.1:1234"), sa("10.2.2.2:80")).with_mark(0x7801);
    let json = serde_json::to_string(&f).unwrap();
    assert!(json.contains("\"proto\":\"tcp\""), "{json}");
    let back: Flow = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f);
    assert_eq!(
        f.to_string(),
        "tcp 10.1.1.1:1234 -> 10.2.2.2:80 ESTABLISHED mark=0x7801"
    );
}
