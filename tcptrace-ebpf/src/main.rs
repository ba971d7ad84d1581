//! The eBPF programs: copy each TCP state transition the kernel makes, and
//! the events that say who owns a socket and how it closed, into per-CPU
//! rings. Everything else (names, owners, time, output) is userspace's
//! job; these run for every transition on the host, so they stay short.
//!
//! - [`state`]: `inet_sock_set_state` emits each transition that passes
//!   the filters; `catch_nested`, attached after it, emits the ones the
//!   kernel skipped it for (made by a softirq that interrupted it).
//! - [`callback`]: `socket_callback` (sock_ops) emits the transitions a
//!   packet or timer drives for the sockets it follows, which the kernel
//!   sometimes runs no tracepoint program for.
//! - [`owners`]: `accepted`, `released`, `forked`, `exited`: which process
//!   holds a socket, since a transition names only the task that made it;
//!   `accept_returned`, `file_closing`, `fd_closed`: the first two's
//!   fentry/fexit twins, for kernels that allow those.
//! - [`holders`]: `task_sockets`, an iterator over every process's
//!   descriptors that userspace reads to learn who holds a socket.
//! - [`reset`]: `tcp_send_reset`, `tcp_receive_reset`: why a socket
//!   went to CLOSE.
//! - [`timewait`]: `time_wait_made`, `time_wait_segment(_done)`,
//!   `time_wait_killed` (fentry/fexit, where the kernel allows them): a
//!   closed connection's time-wait socket, made, moved on by the peer's
//!   FIN, ended.
//!
//! Shared by them: [`config`] (the offsets and filters userspace writes in
//! before loading), [`kernel`] (reading kernel objects at those offsets,
//! the current task), [`filter`] (family, port, namespace) and [`emit`]
//! (the rings and counters).
#![no_std]
#![no_main]

mod callback;
mod config;
mod emit;
mod filter;
mod holders;
mod kernel;
mod owners;
// Singular: `tcp_send_reset`'s log record carries its module's path, and
// `tcptrace::resets`, 16 bytes, would get a `.rodata.cst16` section of its
// own, which aya loads as one more map.
mod reset;
mod state;
mod timewait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
