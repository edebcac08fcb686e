//! Admin API request bodies are parsed strictly: a misspelt or unknown
//! field is refused rather than silently ignored, so `{"sise": ...}` or a
//! field from a newer client never creates a volume with defaults the
//! operator did not ask for.

use stretch_node::CreateVolume;

#[test]
fn create_volume_refuses_unknown_fields() {
    let good: CreateVolume =
        serde_json::from_str(r#"{"name": "vol", "size": 4096, "mode": "sync"}"#)
            .expect("a well-formed request parses");
    assert_eq!(good.name, "vol");
    assert_eq!(good.mode.as_deref(), Some("sync"));
    for body in [
        r#"{"name": "vol", "size": 4096, "modes": "sync"}"#,
        r#"{"name": "vol", "size": 4096, "ownr": "b"}"#,
        r#"{"name": "vol", "size": 4096, "group": "g", "extra": null}"#,
    ] {
        let error = serde_json::from_str::<CreateVolume>(body).expect_err(body);
        assert!(
            error.to_string().contains("unknown field"),
            "{body}: {error}"
        );
    }
}
