// The chat path allocates many small short-lived buffers (JSON, headers);
// mimalloc serves them faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    confab::cli::main()
}
