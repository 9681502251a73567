/* nobpf [--nr N] [--bpf-cmd C]... PROGRAM [ARGS...]: run PROGRAM with the bpf() system
 * call (or system call number N) refused (EPERM), as in a container whose seccomp
 * profile does not allow it; with --bpf-cmd, also (or only, with --nr) bpf() commands
 * C refused. Test helper only. */
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

#define MAX_CMDS 8
#define DENY BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))
#define ALLOW BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

int main(int argc, char **argv)
{
	unsigned int nr = __NR_bpf, cmds[MAX_CMDS];
	int ncmds = 0;
	for (;;) {
		if (argc > 3 && strcmp(argv[1], "--nr") == 0)
			nr = (unsigned int)atoi(argv[2]);
		else if (argc > 3 && strcmp(argv[1], "--bpf-cmd") == 0 && ncmds < MAX_CMDS)
			cmds[ncmds++] = (unsigned int)atoi(argv[2]);
		else
			break;
		argc -= 2;
		argv += 2;
	}
	if (argc < 2) {
		fprintf(stderr, "usage: nobpf [--nr N] [--bpf-cmd C]... PROGRAM [ARGS...]\n");
		return 2;
	}
	struct sock_filter f[8 + MAX_CMDS];
	int n = 0;
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1);
	f[n++] = (struct sock_filter)DENY;
	/* bpf(cmd, ...): the command is the low word of the first argument (little-endian) */
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_bpf, 0, (unsigned char)(ncmds + 1));
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
	for (int i = 0; i < ncmds; i++)
		f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, cmds[i], (unsigned char)(ncmds - i), 0);
	f[n++] = (struct sock_filter)ALLOW;
	f[n++] = (struct sock_filter)DENY;
	struct sock_fprog prog = { (unsigned short)n, f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("nobpf: seccomp");
		return 126;
	}
	execvp(argv[1], argv + 1);
	perror("nobpf: exec");
	return 127;
}
