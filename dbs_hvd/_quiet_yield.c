/*
 * A sched_yield that can sleep, for LD_PRELOAD (see dbs_hvd/quiet_yield.py).
 *
 * Open MPI waits for a collective by polling, and with mpi_yield_when_idle it
 * calls sched_yield between idle polls. sched_yield returns at once when no
 * other thread of the caller's group wants the core, so under a CPU quota the
 * wait is paid out of the quota. Preloaded, this sched_yield sleeps instead,
 * once dbs_hvd_set_yield_sleep_ns sets a sleep; until then it is the system
 * call itself.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile long yield_sleep_ns = 0;

void dbs_hvd_set_yield_sleep_ns(long ns) { yield_sleep_ns = ns > 0 ? ns : 0; }

long dbs_hvd_yield_sleep_ns(void) { return yield_sleep_ns; }

int sched_yield(void) {
    long ns = yield_sleep_ns;
    if (ns <= 0) {
        return (int)syscall(SYS_sched_yield);
    }
    struct timespec pause = {ns / 1000000000L, ns % 1000000000L};
    nanosleep(&pause, NULL);
    return 0;
}
