/*
 * A minimal C userfaultfd page handler: the reference pagefork's fault path is compared with.
 *
 * It does what Firecracker's example handler (src/firecracker/examples/uffd/) does, in one
 * thread: accept one connection on a Unix socket, receive the bare JSON array of mappings plus
 * the uffd (SCM_RIGHTS) in one recvmsg, map the mem-file read-only, then poll the uffd and answer
 * each page fault with one 4 KiB ioctl until the peer hangs up.
 *
 * To be fair to both sides it serves pages the way pagefork does: the mem-file is mapped once
 * and scanned for all-zero pages before accepting (pagefork does this when the server opens the
 * template), all-zero pages get UFFDIO_ZEROPAGE, the others UFFDIO_COPY straight from the
 * mapping; faults are read in batches, EEXIST is success and EAGAIN defers the fault.
 *
 *   usage: c_handler [--fork-per-connection] SOCKET MEM_FILE
 *
 * Prints "ready" once listening, "connected <regions>" after the handshake, and at exit one JSON
 * line of counters and server-side service latencies (the time from reading a fault to its
 * ioctl returning, as pagefork's ForkStats.latency_us measures it).
 *
 * With --fork-per-connection it serves any number of VMMs at once, each connection in its own
 * process (fork() after accept, the mem-file mapping and zero-page index inherited): the most a
 * page server can get out of the machine's cores. Each child prints "connected <regions> <pid>"
 * and its JSON line (with "pid") when its VMM hangs up; the parent stops accepting when its
 * stdin reaches EOF, then waits for its children and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_REGIONS 64
#define MAX_REMOVED 1024
#define READ_BATCH 64
#define LATENCY_RING (1 << 16)

struct region {
	uint64_t base, size, offset;
};

static struct region regions[MAX_REGIONS];
static int nregions;
/* UFFD_EVENT_REMOVE ranges (balloon): later faults there must get zeros, never template bytes. */
static uint64_t removed[MAX_REMOVED][2];
static int nremoved;

static const uint8_t *mem;
static size_t mem_size;
static uint8_t *zero_map; /* one byte per mem-file page: 1 = all zero */

static uint32_t latency_ns[LATENCY_RING];
static uint64_t faults, copied, zeroed, eexist, eagain;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void map_mem_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	mem_size = (size_t)st.st_size;
	mem = mmap(NULL, mem_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (mem == MAP_FAILED)
		die("mmap mem-file");
	close(fd);
	size_t npages = (mem_size + PAGE - 1) / PAGE;
	zero_map = calloc(npages, 1);
	if (!zero_map)
		die("calloc");
	for (size_t p = 0; p < npages; p++) {
		size_t end = (p + 1) * PAGE < mem_size ? (p + 1) * PAGE : mem_size;
		size_t i = p * PAGE;
		while (i < end && mem[i] == 0)
			i++;
		zero_map[p] = i == end;
	}
}

/* The value after "key": in [p, end), or -1 when the key is absent. Enough JSON for
 * Firecracker's flat objects of unsigned integers; quotes keep "size" from matching
 * "page_size". */
static long long field(const char *p, const char *end, const char *key)
{
	char quoted[64];
	int n = snprintf(quoted, sizeof quoted, "\"%s\"", key);
	for (const char *q = p; q + n <= end; q++) {
		if (memcmp(q, quoted, (size_t)n) != 0)
			continue;
		q += n;
		while (q < end && (*q == ' ' || *q == ':' || *q == '\t' || *q == '\n'))
			q++;
		return strtoll(q, NULL, 10);
	}
	return -1;
}

static void parse_mappings(const char *json, size_t len)
{
	const char *end = json + len;
	for (const char *p = json; p < end && nregions < MAX_REGIONS; p++) {
		if (*p != '{')
			continue;
		const char *close = memchr(p, '}', (size_t)(end - p));
		if (!close)
			break;
		long long base = field(p, close, "base_host_virt_addr");
		long long size = field(p, close, "size");
		long long offset = field(p, close, "offset");
		if (base < 0 || size <= 0 || offset < 0 || (uint64_t)(offset + size) > mem_size) {
			fprintf(stderr, "c_handler: bad mapping %d\n", nregions);
			exit(1);
		}
		regions[nregions++] = (struct region){(uint64_t)base, (uint64_t)size, (uint64_t)offset};
		p = close;
	}
	if (nregions == 0) {
		fprintf(stderr, "c_handler: no mappings in handshake\n");
		exit(1);
	}
}

static int receive_handshake(int conn)
{
	static char buf[65536];
	char control[CMSG_SPACE(sizeof(int))];
	struct iovec iov = {buf, sizeof buf - 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
			     .msg_controllen = sizeof control};
	/* Firecracker sends the mappings and the uffd in one sendmsg. */
	ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
	if (n <= 0)
		die("recvmsg");
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
		fprintf(stderr, "c_handler: no uffd in handshake\n");
		exit(1);
	}
	int uffd;
	memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
	parse_mappings(buf, (size_t)n);
	return uffd;
}

static int is_removed(uint64_t addr)
{
	for (int i = 0; i < nremoved; i++)
		if (removed[i][0] <= addr && addr < removed[i][1])
			return 1;
	return 0;
}

/* Serve one fault; 0 when the kernel said EAGAIN and it must be retried. */
static int serve(int uffd, uint64_t address)
{
	uint64_t t0 = now_ns();
	uint64_t page = address & ~(PAGE - 1);
	const struct region *r = NULL;
	for (int i = 0; i < nregions; i++)
		if (regions[i].base <= page && page < regions[i].base + regions[i].size)
			r = &regions[i];
	if (!r) {
		fprintf(stderr, "c_handler: fault at %#lx outside every region\n", (unsigned long)address);
		exit(1);
	}
	uint64_t file_offset = r->offset + (page - r->base);
	int zero = zero_map[file_offset / PAGE] || (nremoved && is_removed(page));
	int rc;
	if (zero) {
		struct uffdio_zeropage z = {.range = {page, PAGE}, .mode = 0};
		rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
	} else {
		struct uffdio_copy c = {.dst = page, .src = (uint64_t)(uintptr_t)(mem + file_offset),
					.len = PAGE, .mode = 0};
		rc = ioctl(uffd, UFFDIO_COPY, &c);
	}
	if (rc < 0) {
		if (errno == EAGAIN) {
			/* An unread REMOVE event blocks copies: read events first, then retry. */
			eagain++;
			return 0;
		}
		if (errno != EEXIST) /* EEXIST: someone installed it first; that is success */
			die(zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY");
		eexist++;
	} else if (zero) {
		zeroed++;
	} else {
		copied++;
	}
	latency_ns[faults++ % LATENCY_RING] = (uint32_t)(now_ns() - t0);
	return 1;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static void report(void)
{
	size_t n = faults < LATENCY_RING ? faults : LATENCY_RING;
	double p[3] = {0, 0, 0};
	const double pts[3] = {50, 90, 99};
	if (n) {
		qsort(latency_ns, n, sizeof latency_ns[0], cmp_u32);
		for (int i = 0; i < 3; i++) {
			size_t k = (size_t)(pts[i] / 100 * (double)n);
			p[i] = latency_ns[k < n ? k : n - 1] / 1000.0;
		}
	}
	printf("{\"pid\": %d, \"faults\": %lu, \"pages_copied\": %lu, \"zero_pages\": %lu, \"already_present\": %lu,"
	       " \"eagain_retries\": %lu, \"latency_us\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}}\n",
	       (int)getpid(), (unsigned long)faults, (unsigned long)copied, (unsigned long)zeroed,
	       (unsigned long)eexist, (unsigned long)eagain, p[0], p[1], p[2]);
	fflush(stdout);
}

/* Serve one VMM's connection until it hangs up, then print the report. */
static int serve_connection(int conn, int tag_pid)
{
	int uffd = receive_handshake(conn);
	/* The VMM created the uffd O_NONBLOCK and called UFFDIO_API; never call it again. */
	if (tag_pid)
		printf("connected %d %d\n", nregions, (int)getpid());
	else
		printf("connected %d\n", nregions);
	fflush(stdout);

	struct uffd_msg msgs[READ_BATCH];
	uint64_t deferred[READ_BATCH * 4];
	int ndeferred = 0;
	struct pollfd fds[2] = {{uffd, POLLIN, 0}, {conn, POLLIN | POLLRDHUP, 0}};
	for (;;) {
		if (poll(fds, 2, ndeferred ? 1 : -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[1].revents) {
			char c;
			if (recv(conn, &c, 1, MSG_DONTWAIT) == 0 || (fds[1].revents & (POLLHUP | POLLERR)))
				break; /* the VMM hung up: its guest is gone */
		}
		ssize_t n = read(uffd, msgs, sizeof msgs);
		if (n < 0 && errno != EAGAIN)
			die("read uffd");
		int count = n > 0 ? (int)(n / (ssize_t)sizeof msgs[0]) : 0;
		int still = 0;
		for (int i = 0; i < ndeferred; i++) /* the oldest faults first */
			if (!serve(uffd, deferred[i]))
				deferred[still++] = deferred[i];
		ndeferred = still;
		for (int i = 0; i < count; i++) {
			const struct uffd_msg *m = &msgs[i];
			if (m->event == UFFD_EVENT_PAGEFAULT) {
				if (!serve(uffd, m->arg.pagefault.address)) {
					if (ndeferred == (int)(sizeof deferred / sizeof deferred[0])) {
						fprintf(stderr, "c_handler: too many deferred faults\n");
						return 1;
					}
					deferred[ndeferred++] = m->arg.pagefault.address;
				}
			} else if (m->event == UFFD_EVENT_REMOVE && nremoved < MAX_REMOVED) {
				removed[nremoved][0] = m->arg.remove.start;
				removed[nremoved][1] = m->arg.remove.end;
				nremoved++;
			}
		}
	}
	report();
	return 0;
}

/* Accept until stdin reaches EOF, one child process per connection; then reap them all. */
static int serve_forking(int lsock, const char *path)
{
	int failed = 0;
	struct pollfd fds[2] = {{lsock, POLLIN, 0}, {STDIN_FILENO, POLLIN, 0}};
	for (;;) {
		int status;
		while (waitpid(-1, &status, WNOHANG) > 0) /* reap as we go: no zombie pile-up */
			failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[1].revents) {
			char buf[256];
			if (read(STDIN_FILENO, buf, sizeof buf) <= 0)
				break; /* the caller is done */
		}
		if (!(fds[0].revents & POLLIN))
			continue;
		int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			close(lsock);
			exit(serve_connection(conn, 1));
		}
		close(conn);
	}
	close(lsock);
	unlink(path);
	int status;
	while (wait(&status) > 0)
		failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	return failed;
}

int main(int argc, char **argv)
{
	int forking = argc == 4 && strcmp(argv[1], "--fork-per-connection") == 0;
	if (argc != 3 && !forking) {
		fprintf(stderr, "usage: %s [--fork-per-connection] SOCKET MEM_FILE\n", argv[0]);
		return 2;
	}
	const char *path = argv[argc - 2];
	map_mem_file(argv[argc - 1]);

	int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (lsock < 0 || strlen(path) >= sizeof sa.sun_path)
		die("socket");
	strcpy(sa.sun_path, path);
	unlink(path);
	if (bind(lsock, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lsock, forking ? 128 : 1) < 0)
		die("bind/listen");
	printf("ready\n");
	fflush(stdout); /* before any fork(): children must not inherit buffered output */
	if (forking)
		return serve_forking(lsock, path);

	int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
	if (conn < 0)
		die("accept");
	close(lsock);
	unlink(path);
	return serve_connection(conn, 0);
}
