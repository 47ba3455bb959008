//! The traces shipped in `traces/` load and behave as traces/README.md says.

use std::path::PathBuf;

use livemig_control::{AdaptivePolicy, Decision, FixedPolicy, Limits, OnNoConverge};
use livemig_sim::{simulate, LinkModel, Outcome, Trace};

/// 100 Mbit/s.
const LINK: f64 = 12.5e6;

fn load(name: &str) -> Trace {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../traces").join(name);
    Trace::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixed(max: f64) -> FixedPolicy {
    FixedPolicy { limits: Limits { max_downtime_ms: max, ..Limits::default() } }
}

fn adaptive(max: f64) -> AdaptivePolicy {
    AdaptivePolicy::new(Limits { max_downtime_ms: max, ..Limits::default() })
}

#[test]
fn all_shipped_traces_load() {
    for name in ["dirty-20mibs.json", "hot.json", "converging.json"] {
        let t = load(name);
        assert!(t.iterations.len() >= 8, "{name}");
        assert!(!t.source.is_empty(), "{name}");
    }
}

#[test]
fn converging_completes_under_both_policies() {
    let t = load("converging.json");
    for r in [
        simulate(&t, &mut fixed(300.0), LinkModel::for_trace(&t, LINK)).unwrap(),
        simulate(&t, &mut adaptive(2000.0), LinkModel::for_trace(&t, LINK)).unwrap(),
    ] {
        assert_eq!(r.outcome, Outcome::Completed, "{}", r.policy);
        assert!(r.downtime_ms.unwrap() <= 300.0, "{}", r.policy);
    }
}

#[test]
fn hot_aborts_under_fixed_300ms_and_completes_under_adaptive_2s() {
    let t = load("hot.json");
    let r = simulate(&t, &mut fixed(300.0), LinkModel::for_trace(&t, LINK)).unwrap();
    assert!(matches!(r.outcome, Outcome::Aborted { .. }), "{:?}", r.outcome);
    let r = simulate(&t, &mut adaptive(2000.0), LinkModel::for_trace(&t, LINK)).unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(r.downtime_ms.unwrap() <= 2000.0);
}

#[test]
fn measured_trace_does_not_fit_2s_at_100mbit_unless_throttled() {
    // The measured WWS (~9600 pages) needs ~3.2 s at 100 Mbit/s: neither policy may switch over
    // into a downtime above its maximum while the guest is left untouched.
    let t = load("dirty-20mibs.json");
    for r in [
        simulate(&t, &mut fixed(300.0), LinkModel::for_trace(&t, LINK)).unwrap(),
        simulate(&t, &mut adaptive(2000.0).on_no_converge(OnNoConverge::Fail), LinkModel::for_trace(&t, LINK)).unwrap(),
    ] {
        assert!(matches!(r.outcome, Outcome::Aborted { .. }), "{}: {:?}", r.policy, r.outcome);
    }
    // Throttling (the adaptive default) slows the guest until it fits.
    let r = simulate(&t, &mut adaptive(2000.0), LinkModel::for_trace(&t, LINK)).unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:#?}");
    assert!(r.downtime_ms.unwrap() <= 2000.0);
    assert!(r.iterations.iter().any(|i| matches!(i.decision, Decision::Throttle { .. })), "{r:#?}");
    // At 1 Gbit/s it fits untouched.
    let r = simulate(&t, &mut adaptive(2000.0), LinkModel::for_trace(&t, 125e6)).unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:#?}");
    assert!(r.iterations.iter().all(|i| i.stats.throttle == 0.0), "{r:#?}");
}
