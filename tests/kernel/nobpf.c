/* nobpf [--nr N] PROGRAM [ARGS...]: run PROGRAM with the bpf() system call (or system
 * call number N) refused (EPERM), as in a container whose seccomp profile does not
 * allow it. Test helper only. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned int nr = __NR_bpf;
	if (argc > 3 && strcmp(argv[1], "--nr") == 0) {
		nr = (unsigned int)atoi(argv[2]);
		argc -= 2;
		argv += 2;
	}
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof f / sizeof f[0], f };
	if (argc < 2) {
		fprintf(stderr, "usage: nobpf PROGRAM [ARGS...]\n");
		return 2;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("nobpf: seccomp");
		return 126;
	}
	execvp(argv[1], argv + 1);
	perror("nobpf: exec");
	return 127;
}
