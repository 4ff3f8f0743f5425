//! The kernel's BTF (read at start to find struct offsets): a malformed blob is an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stallwatch::btf::KernelBtf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = KernelBtf::parse(data) {
        let _ = btf.member_offset("task_struct", "pid");
        let _ = btf.member_offset("sock", "sk_err");
        let _ = btf.has_member("task_struct", "__state");
        let _ = btf.func_proto_param_count("btf_trace_tcp_retransmit_skb");
    }
});
