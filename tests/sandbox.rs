//! The packaged units' seccomp sandbox, applied for real to a daemon that fine-tunes and
//! promotes. systemd builds these settings of `systemd/lathe.service` into seccomp filters:
//! `SystemCallFilter=`, `SystemCallArchitectures=native`, `MemoryDenyWriteExecute=`,
//! `RestrictRealtime=` and `RestrictAddressFamilies=`. This test reads them from the unit file,
//! resolves the call groups as systemd does (`systemd-analyze syscall-filter` lists each
//! group's calls; an allow list starts from `@default`, later lines add or, with `~`, take
//! away), compiles them with libseccomp and loads them in the daemon's process before it
//! starts.
//!
//! A call outside `SystemCallFilter=` kills the daemon with SIGSYS here, what the unit did
//! before it had `SystemCallErrorNumber=EPERM`: the test catches a call that the unit's
//! safety net would turn into a quiet failure. The mount, user and device sandboxing
//! (`ProtectSystem=`, `PrivateUsers=`, …) needs systemd itself and is not reproduced.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

const SCMP_ACT_KILL_PROCESS: u32 = 0x8000_0000;
const SCMP_ACT_ALLOW: u32 = 0x7fff_0000;
const fn scmp_act_errno(errno: i32) -> u32 {
    0x0005_0000 | (errno as u32 & 0xffff)
}
const SCMP_CMP_EQ: c_uint = 4;
/// Linux's AF_MAX (46 since 5.x): every address family number is below it.
const AF_MAX: u64 = 46;
const SCMP_CMP_GT: c_uint = 6;
const SCMP_CMP_MASKED_EQ: c_uint = 7;

/// libseccomp's `struct scmp_arg_cmp`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ArgCmp {
    arg: c_uint,
    op: c_uint,
    datum_a: u64,
    datum_b: u64,
}

/// libseccomp 2.5, opened at run time (Debian's libseccomp2, which systemd itself needs), so
/// the build needs no -dev package.
struct Seccomp {
    init: InitFn,
    resolve: ResolveFn,
    rule: RuleFn,
    export: ExportFn,
    release: ReleaseFn,
}

type InitFn = unsafe extern "C" fn(u32) -> *mut c_void;
type ResolveFn = unsafe extern "C" fn(*const c_char) -> c_int;
type RuleFn = unsafe extern "C" fn(*mut c_void, u32, c_int, c_uint, *const ArgCmp) -> c_int;
type ExportFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
type ReleaseFn = unsafe extern "C" fn(*mut c_void);

impl Seccomp {
    fn open() -> Option<Seccomp> {
        // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the
        // signature libseccomp 2.x declares for it in seccomp.h.
        unsafe {
            let lib = libc::dlopen(c"libseccomp.so.2".as_ptr(), libc::RTLD_NOW);
            if lib.is_null() {
                return None;
            }
            let sym = |name: &std::ffi::CStr| {
                let f = libc::dlsym(lib, name.as_ptr());
                assert!(!f.is_null(), "libseccomp has no {name:?}");
                f
            };
            Some(Seccomp {
                init: std::mem::transmute::<*mut c_void, InitFn>(sym(c"seccomp_init")),
                resolve: std::mem::transmute::<*mut c_void, ResolveFn>(sym(c"seccomp_syscall_resolve_name")),
                rule: std::mem::transmute::<*mut c_void, RuleFn>(sym(c"seccomp_rule_add_array")),
                export: std::mem::transmute::<*mut c_void, ExportFn>(sym(c"seccomp_export_bpf")),
                release: std::mem::transmute::<*mut c_void, ReleaseFn>(sym(c"seccomp_release")),
            })
        }
    }

    /// The call's number on this machine, None where the architecture has no such call
    /// (systemd skips those too).
    fn number(&self, name: &str) -> Option<c_int> {
        let name = CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name.
        let nr = unsafe { (self.resolve)(name.as_ptr()) };
        (nr >= 0).then_some(nr)
    }

    /// A BPF program (the kernel's `struct sock_filter` array) that answers `default` to any
    /// call no rule matches; each rule is (action, call, argument comparisons).
    fn compile(&self, default: u32, rules: &[(u32, &str, Vec<ArgCmp>)]) -> Vec<libc::sock_filter> {
        // SAFETY: a fresh context, given only live pointers, released before returning.
        unsafe {
            let ctx = (self.init)(default);
            assert!(!ctx.is_null());
            for (action, call, args) in rules {
                let Some(nr) = self.number(call) else { continue };
                let rc = (self.rule)(ctx, *action, nr, args.len() as c_uint, args.as_ptr());
                assert!(rc == 0, "seccomp_rule_add({call}): {rc}");
            }
            let mut file = tempfile();
            assert_eq!((self.export)(ctx, file.as_raw_fd()), 0);
            (self.release)(ctx);
            let mut bytes = Vec::new();
            file.rewind().unwrap();
            file.read_to_end(&mut bytes).unwrap();
            bytes
                .chunks_exact(8)
                .map(|c| libc::sock_filter {
                    code: u16::from_ne_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect()
        }
    }
}

fn tempfile() -> std::fs::File {
    let path = common::temp_dir("seccomp-bpf").join("filter.bpf");
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap()
}

/// The `[Service]` settings of a unit file, each key with its values in order.
fn unit_settings(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

/// The calls a group (`@system-service`) or a single name stands for, as systemd knows them.
fn expand(item: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_string()]);
    }
    if let Some(known) = cache.get(item) {
        return known.clone();
    }
    let out = Command::new("systemd-analyze").args(["syscall-filter", item]).output().unwrap();
    assert!(out.status.success(), "systemd-analyze syscall-filter {item}: {}", String::from_utf8_lossy(&out.stderr));
    let mut calls = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        calls.extend(expand(line, cache));
    }
    cache.insert(item.to_string(), calls.clone());
    calls
}

/// `SystemCallFilter=` lines resolved into the calls they allow, as systemd does.
fn allowed_calls(lines: &[String]) -> BTreeSet<String> {
    let mut cache = BTreeMap::new();
    assert!(!lines.is_empty() && !lines[0].starts_with('~'), "expected an allow list first: {lines:?}");
    let mut allowed = expand("@default", &mut cache);
    for line in lines {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line.as_str()),
        };
        for item in items.split_whitespace() {
            for call in expand(item, &mut cache) {
                if deny {
                    allowed.remove(&call);
                } else {
                    allowed.insert(call);
                }
            }
        }
    }
    allowed
}

const SECCOMP_SETTINGS: [&str; 5] = [
    "SystemCallFilter",
    "SystemCallArchitectures",
    "RestrictRealtime",
    "RestrictAddressFamilies",
    "SystemCallErrorNumber",
];

/// The filters systemd would load for `unit`'s settings, the allow list last (loading a
/// filter is itself a call the allow list may not hold).
fn unit_filters(seccomp: &Seccomp, unit: &BTreeMap<String, Vec<String>>) -> Vec<Vec<libc::sock_filter>> {
    let one = |k: &str| unit.get(k).and_then(|v| v.last()).map(String::as_str);
    let arg = |arg, op, a, b| vec![ArgCmp { arg, op, datum_a: a, datum_b: b }];
    let mut filters = Vec::new();
    assert_eq!(one("SystemCallArchitectures"), Some("native")); // libseccomp's context: native only
    if one("MemoryDenyWriteExecute") == Some("yes") {
        // systemd's rules: no mapping both writable and executable, nothing made executable
        // after the fact, no executable shared memory.
        let (w, x) = (libc::PROT_WRITE as u64, libc::PROT_EXEC as u64);
        let deny = scmp_act_errno(libc::EPERM);
        filters.push(seccomp.compile(
            SCMP_ACT_ALLOW,
            &[
                (deny, "mmap", arg(2, SCMP_CMP_MASKED_EQ, w | x, w | x)),
                (deny, "mprotect", arg(2, SCMP_CMP_MASKED_EQ, x, x)),
                (deny, "pkey_mprotect", arg(2, SCMP_CMP_MASKED_EQ, x, x)),
                (deny, "shmat", arg(2, SCMP_CMP_MASKED_EQ, libc::SHM_EXEC as u64, libc::SHM_EXEC as u64)),
            ],
        ));
    }
    if one("RestrictRealtime") == Some("yes") {
        let deny = scmp_act_errno(libc::EPERM);
        let policy = |op, v: i32| arg(1, op, v as u64, 0);
        filters.push(seccomp.compile(
            SCMP_ACT_ALLOW,
            &[
                (deny, "sched_setscheduler", policy(SCMP_CMP_EQ, libc::SCHED_FIFO)),
                (deny, "sched_setscheduler", policy(SCMP_CMP_EQ, libc::SCHED_RR)),
                (deny, "sched_setscheduler", policy(SCMP_CMP_GT, libc::SCHED_IDLE)),
            ],
        ));
    }
    if let Some(families) = one("RestrictAddressFamilies") {
        let family = |name: &str| match name {
            "AF_UNIX" => libc::AF_UNIX,
            "AF_INET" => libc::AF_INET,
            "AF_INET6" => libc::AF_INET6,
            other => panic!("a family this test does not know: {other}"),
        } as u64;
        // As systemd builds it: `socket()` refused for every family not listed.
        let allowed: BTreeSet<u64> = families.split_whitespace().map(family).collect();
        let deny = scmp_act_errno(libc::EAFNOSUPPORT);
        let mut rules: Vec<(u32, &str, Vec<ArgCmp>)> =
            (0..AF_MAX).filter(|f| !allowed.contains(f)).map(|f| (deny, "socket", arg(0, SCMP_CMP_EQ, f, 0))).collect();
        rules.push((deny, "socket", arg(0, SCMP_CMP_GT, AF_MAX - 1, 0)));
        filters.push(seccomp.compile(SCMP_ACT_ALLOW, &rules));
    }
    let allowed = allowed_calls(&unit["SystemCallFilter"]);
    let rules: Vec<(u32, &str, Vec<ArgCmp>)> = allowed.iter().map(|c| (SCMP_ACT_ALLOW, c.as_str(), vec![])).collect();
    filters.push(seccomp.compile(SCMP_ACT_KILL_PROCESS, &rules));
    filters
}

/// Makes `command` load `filters` in the child, between fork and exec, as systemd does.
fn sandbox(command: &mut Command, filters: Vec<Vec<libc::sock_filter>>) {
    // SAFETY: the closure makes only prctl calls (async-signal-safe) on memory it owns.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for f in &filters {
                let prog = libc::sock_fprog { len: f.len() as u16, filter: f.as_ptr().cast_mut() };
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What the sandbox needs here, or why the test skips (LATHE_REQUIRE_SANDBOX=1, as in CI,
/// makes a missing piece a failure).
fn sandbox_or_skip() -> Option<Seccomp> {
    let analyze = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    let seccomp = Seccomp::open();
    let why = match (analyze, &seccomp) {
        (false, _) => "systemd-analyze is not installed (apt-get install -y systemd)",
        (_, None) => "libseccomp.so.2 is not installed (apt-get install -y libseccomp2)",
        _ => return seccomp,
    };
    assert!(std::env::var("LATHE_REQUIRE_SANDBOX").as_deref() != Ok("1"), "LATHE_REQUIRE_SANDBOX=1: {why}");
    eprintln!("skipped: {why}");
    None
}

/// The daemon under `filters`, with 1,200 labelled rows of the faulty sensor stored, asked
/// to fine-tune.
fn fine_tune_under(
    node: &str,
    broker: &common::Broker,
    filters: Vec<Vec<libc::sock_filter>>,
) -> (common::Daemon, common::Collector) {
    let dir = common::temp_dir(node);
    let model = common::root().join("models/shuttle-mlp-1.lathe");
    let config = common::config(node, broker, &dir.join("state"), &model)
        + "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\" }\n"
        + "[pipeline.train]\ntrigger = []\nmin_rows = 800\nrows = 1500\n";
    let daemon = common::Daemon::start_with(&dir, &config, |c| sandbox(c, filters));
    common::wait_online(broker.port, node, &daemon);
    let out = common::Collector::new(broker.port, &["plant/line1/+/prediction", &format!("lathe/{node}/events")]);
    let rows = common::faulty(&common::unseen()[..1200]);
    let mut p = common::Publisher::new(broker.port);
    for (seq, (row, _)) in rows.iter().enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), common::shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", rows.len(), Duration::from_secs(60)), "log:\n{}", daemon.log());
    for (seq, (_, label)) in rows.iter().enumerate() {
        p.publish(&format!("plant/line1/dev{}/label", seq % 4), json!({"seq": seq, "anomaly": label}).to_string());
    }
    p.flush();
    std::thread::sleep(Duration::from_millis(500)); // the last labels reach the store
    p.publish(&format!("lathe/{node}/cmd/train"), json!({"pipeline": "shuttle"}).to_string());
    p.flush();
    (daemon, out)
}

#[test]
fn the_packaged_units_seccomp_filter_lets_the_loop_fine_tune_and_promote() {
    let Some(seccomp) = sandbox_or_skip() else { return };
    let Some(broker) = common::Broker::start_mosquitto("the daemon under the unit's filter") else { return };
    let cpu = unit_settings(&common::root().join("systemd/lathe.service"));
    let gpu = unit_settings(&common::root().join("systemd/lathe-gpu.service"));
    // One run covers both units: the GPU unit differs only in the devices it reaches and in
    // allowing writable-executable memory (CUDA's driver needs it).
    for key in SECCOMP_SETTINGS {
        assert_eq!(cpu.get(key), gpu.get(key), "{key}= differs between the units");
    }
    assert_eq!(cpu["SystemCallErrorNumber"], ["EPERM"], "the safety net");
    assert_eq!(cpu["MemoryDenyWriteExecute"], ["yes"]);

    // The filter the units had before: @resources taken away whole. The training thread's
    // first call to lower its priority kills the daemon, and this test must see that.
    let mut old = cpu.clone();
    old.get_mut("SystemCallFilter").unwrap().retain(|l| !l.contains("sched_setscheduler"));
    let (mut killed, _) = fine_tune_under("sandboxold", &broker, unit_filters(&seccomp, &old));
    assert!(
        common::wait_until(Duration::from_secs(30), || !killed.running()),
        "the old filter did not stop the fine-tune; log:\n{}",
        killed.log()
    );
    assert_eq!(killed.exit_status().and_then(|s| s.signal()), Some(libc::SIGSYS), "log:\n{}", killed.log());

    // The units' filter: the whole loop, fine-tune to promotion, and the daemon stops cleanly.
    let (mut daemon, out) = fine_tune_under("sandbox", &broker, unit_filters(&seccomp, &cpu));
    let events = || out.on("lathe/sandbox/events");
    let seen = |step: &str| events().iter().any(|e| e["event"] == step);
    assert!(
        common::wait_until(Duration::from_secs(120), || seen("trial.started") || seen("train.refused")),
        "no promotion; events {:?}\nlog:\n{}",
        events().iter().map(|e| e["event"].clone()).collect::<Vec<_>>(),
        daemon.log()
    );
    let accepted = events().into_iter().find(|e| e["event"] == "train.accepted").expect("the run was accepted");
    assert_eq!(accepted["run"]["gate"]["accepted"], true);
    assert!(seen("trial.started"), "v2 went on trial");
    assert!(daemon.running(), "log:\n{}", daemon.log());
    assert!(daemon.stop(), "a clean stop under the filter; log:\n{}", daemon.log());
}
