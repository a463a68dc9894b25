/*
 * Records which 4 KiB pages of one executable's code run, in the order they first run:
 * the input of `cargo xtask layout` (see xtask/src/layout.rs).
 *
 * Loaded with LD_PRELOAD into every process of a benchmark run; it acts only in the process
 * that maps TRACE_BIN. Its constructor makes that mapping's code inaccessible; each first
 * execution of a page then faults, the handler appends the page's file offset (hex) to
 * TRACE_OUT and makes the page executable again. Pages are re-enabled one by one, so each
 * is its own mapping and the kernel's fault-around cannot hide the neighbours.
 *
 * The program's own SIGSEGV handler (Rust's stack-overflow report) is not installed while
 * tracing: a tracing run is not a run whose crashes matter.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long lo, hi, file_offset;
static int out = -1;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void)
{
	static sigaction_fn real;
	if (!real)
		real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
	return real;
}

static void on_fault(int sig, siginfo_t *info, void *context)
{
	unsigned long addr = (unsigned long)info->si_addr;
	(void)context;
	if (addr >= lo && addr < hi) {
		unsigned long page = addr & ~4095UL;
		char digits[20], line[24];
		unsigned long value = page - lo + file_offset;
		int n = 0, k = 0;
		mprotect((void *)page, 4096, PROT_READ | PROT_EXEC);
		do {
			digits[k++] = "0123456789abcdef"[value % 16];
			value /= 16;
		} while (value);
		while (k)
			line[n++] = digits[--k];
		line[n++] = '\n';
		/* One write per line, O_APPEND: lines of concurrent threads never interleave. */
		if (write(out, line, n) != n)
			_exit(99);
		return;
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	if (sig == SIGSEGV && act && lo) {
		if (old)
			memset(old, 0, sizeof *old);
		return 0;
	}
	return real_sigaction()(sig, act, old);
}

__attribute__((constructor)) static void start(void)
{
	const char *binary = getenv("TRACE_BIN"), *trace = getenv("TRACE_OUT");
	char line[4096];
	FILE *maps;
	struct sigaction handler;
	if (!binary || !trace || !(maps = fopen("/proc/self/maps", "r")))
		return;
	while (fgets(line, sizeof line, maps)) {
		unsigned long start, end, offset;
		char perms[8], path[4096] = "";
		if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %4095s", &start, &end, perms, &offset,
			   path) >= 4 &&
		    perms[2] == 'x' && strcmp(path, binary) == 0) {
			lo = start;
			hi = end;
			file_offset = offset;
		}
	}
	fclose(maps);
	if (!lo)
		return;
	out = open(trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (out < 0) {
		perror("trace.so: TRACE_OUT");
		_exit(99);
	}
	memset(&handler, 0, sizeof handler);
	handler.sa_sigaction = on_fault;
	handler.sa_flags = SA_SIGINFO | SA_NODEFER;
	real_sigaction()(SIGSEGV, &handler, NULL);
	mprotect((void *)lo, hi - lo, PROT_NONE);
}
