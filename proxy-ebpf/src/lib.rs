#![no_std]
// Lets cargo treat proxy-ebpf as a library on the host; the programs are in main.rs.
