//! Unit tests against a fake QMP server on a socket pair.

use super::*;
use std::io::{BufRead, BufReader};
use std::thread::{self, JoinHandle};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
const T: Duration = Duration::from_secs(5);

/// The server end: reads commands, writes raw lines.
struct Server {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Server {
    fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }
    /// Reads a command, checks its name, returns its id.
    fn expect(&mut self, command: &str) -> (Value, Value) {
        let v = self.recv();
        assert_eq!(v["execute"], command, "{v}");
        (
            v["id"].clone(),
            v.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }
    fn reply(&mut self, id: &Value, ret: Value) {
        self.send(&json!({ "return": ret, "id": id }).to_string());
    }
    /// Greeting + qmp_capabilities.
    fn handshake(&mut self) {
        self.send(GREETING);
        let (id, _) = self.expect("qmp_capabilities");
        self.reply(&id, json!({}));
    }
}

fn fake<F>(script: F) -> (UnixStream, JoinHandle<()>)
where
    F: FnOnce(Server) + Send + 'static,
{
    let (client, server) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || {
        let w = server.try_clone().unwrap();
        script(Server {
            r: BufReader::new(server),
            w,
        });
    });
    (client, h)
}

fn connected<F>(script: F) -> (Qmp, JoinHandle<()>)
where
    F: FnOnce(Server) + Send + 'static,
{
    let (c, h) = fake(|mut s| {
        s.handshake();
        script(s);
    });
    (Qmp::from_stream(c, T).unwrap(), h)
}

#[test]
fn greeting_and_capabilities() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("query-status");
        s.reply(
            &id,
            json!({"status": "prelaunch", "singlestep": false, "running": false}),
        );
    });
    assert_eq!(q.greeting()["version"]["qemu"]["major"], 7);
    let st = q.query_status().unwrap();
    assert_eq!(st.status, "prelaunch");
    assert!(!st.running);
    h.join().unwrap();
}

#[test]
fn peer_pid_of_socket_pair_is_ours() {
    let (q, h) = connected(|_| {});
    assert_eq!(q.peer_pid().unwrap(), std::process::id());
    h.join().unwrap();
}

#[test]
fn missing_greeting_is_protocol_error() {
    let (c, h) = fake(|mut s| s.send(r#"{"return": {}}"#));
    let e = Qmp::from_stream(c, T).unwrap_err();
    assert!(matches!(e, QmpError::Protocol(_)), "{e}");
    h.join().unwrap();
}

#[test]
fn error_reply_carries_class_and_desc() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("nope");
        s.send(
            &json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": id})
                .to_string(),
        );
    });
    match q.execute("nope", None).unwrap_err() {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "nope");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("not been found"));
        }
        e => panic!("unexpected {e:?}"),
    }
    h.join().unwrap();
}

#[test]
fn error_message_is_a_sentence() {
    let e = QmpError::Command {
        command: "migrate".into(),
        class: "GenericError".into(),
        desc: "boom".into(),
    };
    assert_eq!(e.to_string(), "QEMU refused `migrate`: boom");
}

#[test]
fn events_interleaved_with_replies_are_queued() {
    let (mut q, h) = connected(|mut s| {
        let (id, args) = s.expect("stop");
        assert_eq!(args, Value::Null);
        s.send(r#"{"timestamp": {"seconds": 10, "microseconds": 5}, "event": "STOP"}"#);
        s.send(r#"{"timestamp": {"seconds": 11, "microseconds": 6}, "event": "MIGRATION", "data": {"status": "setup"}}"#);
        s.reply(&id, json!({}));
        s.send(r#"{"timestamp": {"seconds": 12, "microseconds": 7}, "event": "RESUME"}"#);
        s.send(r#"{"timestamp": {"seconds": 13, "microseconds": 8}, "event": "SHUTDOWN", "data": {"guest": false}}"#);
    });
    q.stop().unwrap();
    let ev = q.wait_event("SHUTDOWN", T).unwrap();
    assert_eq!(ev.data["guest"], false);
    assert_eq!(ev.timestamp, (13, 8));
    let evs = q.take_events();
    let names: Vec<&str> = evs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["STOP", "MIGRATION", "RESUME"]);
    assert_eq!(evs[0].data, Value::Null);
    assert_eq!(evs[1].data["status"], "setup");
    assert!(q.take_events().is_empty());
    h.join().unwrap();
}

#[test]
fn wait_event_takes_queued_event_first() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("cont");
        s.send(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#);
        s.reply(&id, json!({}));
    });
    q.cont().unwrap();
    assert_eq!(q.wait_event("RESUME", T).unwrap().timestamp, (1, 2));
    h.join().unwrap();
}

#[test]
fn wait_event_times_out() {
    let (mut q, h) = connected(|mut s| {
        s.send(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#);
        // Keep the connection open until the client gave up.
        let _ = s.recv();
    });
    let e = q
        .wait_event("RESUME", Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert_eq!(q.take_events().len(), 1);
    q.execute("x", None).ok();
    drop(q);
    h.join().unwrap();
}

#[test]
fn command_times_out_and_late_reply_is_skipped() {
    let (mut q, h) = connected(|mut s| {
        let (id1, _) = s.expect("slow");
        let (id2, _) = s.expect("query-status");
        s.reply(&id1, json!("late"));
        s.reply(&id2, json!({"status": "running", "running": true}));
    });
    q.set_timeout(Duration::from_millis(100));
    let e = q.execute("slow", None).unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    q.set_timeout(T);
    assert!(q.query_status().unwrap().running);
    h.join().unwrap();
}

#[test]
fn eof_mid_reply_is_closed() {
    let (mut q, h) = connected(|mut s| {
        let _ = s.expect("query-status");
        s.w.write_all(br#"{"return": {"status": "run"#).unwrap();
    });
    let e = q.query_status().unwrap_err();
    assert!(matches!(e, QmpError::Closed), "{e:?}");
    assert_eq!(e.to_string(), "QEMU closed the QMP connection");
    h.join().unwrap();
}

#[test]
fn garbage_json_is_protocol_error() {
    let (mut q, h) = connected(|mut s| {
        let _ = s.expect("query-status");
        s.send("{this is not json");
    });
    let e = q.query_status().unwrap_err();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
    h.join().unwrap();
}

#[test]
fn non_object_and_unknown_messages_are_protocol_errors() {
    let (mut q, h) = connected(|mut s| {
        let _ = s.expect("a");
        s.send("[1, 2]");
        let _ = s.expect("b");
        s.send(r#"{"hello": 1}"#);
    });
    assert!(matches!(q.execute("a", None), Err(QmpError::Protocol(_))));
    assert!(matches!(q.execute("b", None), Err(QmpError::Protocol(_))));
    h.join().unwrap();
}

#[test]
fn wrong_reply_shape_is_protocol_error() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("query-status");
        s.reply(&id, json!([1]));
    });
    let e = q.query_status().unwrap_err();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
    h.join().unwrap();
}

#[test]
fn oversized_line_is_refused_without_unbounded_allocation() {
    let (mut q, h) = connected(|mut s| {
        let _ = s.expect("query-status");
        let chunk = vec![b'x'; 1 << 20];
        // 17 MiB without a newline; stop when the client hangs up.
        for _ in 0..17 {
            if s.w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let e = q.query_status().unwrap_err();
    assert!(
        matches!(e, QmpError::Protocol(ref m) if m.contains("longer")),
        "{e:?}"
    );
    assert!(q.rbuf.is_empty());
    drop(q);
    h.join().unwrap();
}

#[test]
fn arguments_are_sent() {
    let (mut q, h) = connected(|mut s| {
        let (id, args) = s.expect("migrate-set-capabilities");
        assert_eq!(
            args,
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
        );
        s.reply(&id, json!({}));
        let (id, args) = s.expect("migrate");
        assert_eq!(args, json!({"uri": "unix:/tmp/x"}));
        s.reply(&id, json!({}));
        let (id, args) = s.expect("qom-get");
        assert_eq!(
            args,
            json!({"path": "/objects/mem0", "property": "mem-path"})
        );
        s.reply(&id, json!("/dev/shm/x"));
    });
    q.migrate_set_capabilities(&[("x-ignore-shared", true)])
        .unwrap();
    q.migrate("unix:/tmp/x").unwrap();
    assert_eq!(
        q.qom_get("/objects/mem0", "mem-path").unwrap(),
        "/dev/shm/x"
    );
    h.join().unwrap();
}

#[test]
fn query_memdev_parses() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("query-memdev");
        s.reply(
            &id,
            json!([{"share": true, "reserve": true, "prealloc": false, "host-nodes": [], "size": 268435456u64,
                    "merge": true, "dump": true, "policy": "default", "id": "mem0"}]),
        );
    });
    let m = q.query_memdev().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].id.as_deref(), Some("mem0"));
    assert_eq!(m[0].size, 256 << 20);
    assert!(m[0].share);
    h.join().unwrap();
}

#[test]
fn wait_migration_polls_until_completed() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("query-migrate");
        s.reply(&id, json!({"status": "active", "ram": {"transferred": 10, "remaining": 5, "total": 15, "mbps": 1.5}}));
        let (id, _) = s.expect("query-migrate");
        s.reply(
            &id,
            json!({"status": "completed", "downtime": 7, "total-time": 99,
                             "ram": {"transferred": 20, "remaining": 0, "total": 15}}),
        );
        let (id, _) = s.expect("query-migrate");
        s.reply(&id, json!({"status": "failed", "error-desc": "no route"}));
    });
    let info = q.wait_migration(T).unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"));
    assert_eq!(info.downtime, Some(7));
    assert_eq!(info.total_time, Some(99));
    assert_eq!(info.transferred, Some(20));
    assert_eq!(info.remaining, Some(0));
    let info = q.query_migrate().unwrap();
    assert!(info.is_finished());
    assert_eq!(info.error_desc.as_deref(), Some("no route"));
    h.join().unwrap();
}

#[test]
fn wait_migration_times_out() {
    let (mut q, h) = connected(|mut s| loop {
        let v = s.recv_opt();
        let Some(v) = v else { return };
        s.reply(&v["id"], json!({"status": "active"}));
    });
    let e = q.wait_migration(Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(e, QmpError::Timeout { ref what } if what.contains("active")),
        "{e}"
    );
    drop(q);
    h.join().unwrap();
}

#[test]
fn quit_accepts_hangup() {
    let (mut q, h) = connected(|mut s| {
        let _ = s.expect("quit");
        s.send(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false}}"#);
    });
    q.quit().unwrap();
    assert_eq!(q.take_events()[0].name, "SHUTDOWN");
    h.join().unwrap();
}

#[test]
fn connect_to_missing_socket_names_the_path() {
    let dir = std::env::temp_dir().join(format!("livemig-qmp-missing-{}", std::process::id()));
    let path = dir.join("nope.sock");
    let e = Qmp::connect(&path, T).unwrap_err();
    assert!(matches!(e, QmpError::Connect { .. }));
    assert!(e.to_string().contains("nope.sock"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn connect_over_a_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || {
        let (server, _) = listener.accept().unwrap();
        let w = server.try_clone().unwrap();
        let mut s = Server {
            r: BufReader::new(server),
            w,
        };
        s.handshake();
    });
    let q = Qmp::connect(&path, T).unwrap();
    assert_eq!(q.peer_pid().unwrap(), std::process::id());
    h.join().unwrap();
}

impl Server {
    fn recv_opt(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&l).ok(),
        }
    }
}

#[test]
fn event_queue_is_bounded() {
    let (mut q, h) = connected(|mut s| {
        let (id, _) = s.expect("stop");
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            s.send(&format!(
                r#"{{"timestamp": {{"seconds": {i}, "microseconds": 0}}, "event": "E"}}"#
            ));
        }
        s.reply(&id, json!({}));
    });
    q.stop().unwrap();
    let evs = q.take_events();
    assert_eq!(evs.len(), MAX_QUEUED_EVENTS);
    assert_eq!(evs[0].timestamp.0, 10);
    h.join().unwrap();
}
