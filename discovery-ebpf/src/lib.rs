// Lets the agent's build.rs depend on this crate so cargo rebuilds the
// programs when their sources change (aya-template's pattern).
#![no_std]
