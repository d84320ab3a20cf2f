// SPDX-License-Identifier: GPL-2.0
/*
 * vdpactl: the two vdpa generic-netlink requests the peer benchmark needs, with loopbackd's own code
 * (Sources/CLinux/vduse.c): put a VDUSE device that another process created (qemu-storage-daemon's vduse-blk
 * export) on the vDPA bus, and take it off again. What iproute2's `vdpa dev add name NAME mgmtdev vduse` and
 * `vdpa dev del NAME` do.
 *   vdpactl add NAME      vdpactl del NAME
 */
#include <stdio.h>
#include <string.h>
#include "lbvduse.h"

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[1], "add") && strcmp(argv[1], "del"))) {
		fprintf(stderr, "usage: vdpactl add|del NAME\n");
		return 2;
	}
	int add = !strcmp(argv[1], "add");
	int r = lb_vdpa_dev(argv[2], add ? "vduse" : NULL, add);
	if (r) { fprintf(stderr, "vdpactl %s %s: %s\n", argv[1], argv[2], strerror(-r)); return 1; }
	return 0;
}
