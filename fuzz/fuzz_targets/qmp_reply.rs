//! The QMP client's parsing of what QEMU sends: a `Qmp` on one end of a unix socket pair whose
//! other end holds the fuzz input (greeting, replies and events) and is then closed for writing.
//! The client reads the greeting, negotiates capabilities, then runs the commands the agents use;
//! each reads the next replies. Input: `[mode][server output]`; mode selects the order of the
//! commands. Contract: never panic (errors are fine); the input ends in EOF, so nothing waits for
//! a timeout.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use livemig_qmp::Qmp;

/// Server output beyond this is cut (the socket buffer must hold all of it: nothing reads it
/// concurrently). libFuzzer's -max_len in scripts/fuzz stays below.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, output)) = data.split_first() else { return };
    let output = &output[..output.len().min(MAX_INPUT)];
    let (client, mut server) = UnixStream::pair().expect("socket pair");
    server.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    server.write_all(output).expect("the socket buffer holds the input");
    server.shutdown(Shutdown::Write).expect("shutdown");
    let timeout = Duration::from_secs(5);
    let Ok(mut qmp) = Qmp::from_stream(client, timeout) else { return };
    let _ = qmp.greeting().to_string();
    for step in 0..8u8 {
        let r = match step.wrapping_add(mode) % 8 {
            0 => qmp.query_status().map(drop),
            1 => qmp.query_memdev().map(drop),
            2 => qmp.query_migrate().map(|i| {
                let _ = i.is_finished();
            }),
            3 => qmp.qom_get("/machine", "type").map(drop),
            4 => qmp.wait_event("STOP", timeout).map(drop),
            5 => qmp.wait_migration(timeout).map(drop),
            6 => qmp.stop(),
            _ => qmp.quit(),
        };
        let _ = qmp.take_events();
        if let Err(e) = r {
            let _ = e.to_string();
            if matches!(e, livemig_qmp::QmpError::Closed) {
                break;
            }
        }
    }
    drop(server);
});
