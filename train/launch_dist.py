"""Start a parameter-server training job: scheduler, S servers and W workers.

    python train/launch_dist.py -n 2 -s 1 -- python train/train.py --kvstore dist_sync ...
    python train/launch_dist.py -n 4 -s 2 --launcher ssh --hostfile hosts -- python train/train.py ...

SIGINT, SIGTERM or SIGHUP to the launcher or to any process of the job stops the whole job after the
same step on every worker (the chief writes the resume snapshot); the launcher then exits with 128 + the
signal, naming who got it. Any other failure exits with status 2, naming the process.
"""
import argparse
import sys

from recognition.distributed import JobStopped, launch
from recognition.utils import run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-n', '--num-workers', type=int, required=True, help='worker processes')
    parser.add_argument('-s', '--num-servers', type=int, default=1, help='server processes')
    parser.add_argument('--launcher', choices=['local', 'ssh'], default='local')
    parser.add_argument('--hostfile', help='ssh launcher: one host per line; the first runs the scheduler')
    parser.add_argument('--port', type=int, help='scheduler port (default: a free one locally, 9091 over ssh)')
    parser.add_argument('--env', default='', help='comma-separated variables to forward over ssh '
                        '(the local launcher forwards the whole environment)')
    parser.add_argument('--timeout', type=float, help='stop everything after this many seconds')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='the worker command, after --')
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    forward = [k for k in args.env.split(',') if k]
    try:
        return launch(command, args.num_workers, args.num_servers, args.launcher, args.hostfile, forward,
                      args.port, args.timeout)
    except JobStopped as e:
        print(f'error: {e}', file=sys.stderr)
        return e.status


if __name__ == '__main__':
    run_cli(main)
