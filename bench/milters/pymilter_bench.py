"""The pymilter side of the benchmark: the same shapes as milter.c.

Usage: /usr/bin/python3 pymilter_bench.py s1|s2|s3|s4|big SOCKET
"""
import sys
import time

import Milter
from Milter import CONTINUE, noreply


class S1(Milter.Base):
    def connect(self, hostname, family, hostaddr): return CONTINUE
    def hello(self, hostname): return CONTINUE
    def envfrom(self, f, *a): return CONTINUE
    def envrcpt(self, to, *a): return CONTINUE
    def data(self): return CONTINUE
    def header(self, name, value): return CONTINUE
    def eoh(self): return CONTINUE
    def body(self, chunk): return CONTINUE
    def unknown(self, cmd): return CONTINUE
    def abort(self): return CONTINUE
    def close(self): return CONTINUE

    def eom(self):
        self.addheader('X-Bench', 'py')
        return CONTINUE


class S2(Milter.Base):
    @noreply
    def connect(self, hostname, family, hostaddr): return CONTINUE
    @noreply
    def hello(self, hostname): return CONTINUE
    @noreply
    def envfrom(self, f, *a): return CONTINUE
    @noreply
    def envrcpt(self, to, *a): return CONTINUE
    @noreply
    def data(self): return CONTINUE
    @noreply
    def header(self, name, value): return CONTINUE
    @noreply
    def eoh(self): return CONTINUE
    @noreply
    def body(self, chunk): return CONTINUE

    def eom(self):
        self.addheader('X-Bench', 'py')
        return CONTINUE


class S3(Milter.Base):
    def eom(self):
        self.addheader('X-Bench', 'py')
        return CONTINUE


class S4(S2):
    def eom(self):
        time.sleep(0.002)
        self.addheader('X-Bench', 'py')
        return CONTINUE


class Big(Milter.Base):
    def __init__(self):
        self.chunks = []

    @noreply
    def body(self, chunk):
        self.chunks.append(chunk)
        return CONTINUE

    def eom(self):
        self.addheader('X-Bench', 'py')
        self.replacebody(b''.join(self.chunks))
        self.chunks = []
        return CONTINUE

    def abort(self):
        self.chunks = []
        return CONTINUE


SHAPES = {'s1': S1, 's2': S2, 's3': S3, 's4': S4, 'big': Big}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit('usage: pymilter_bench.py s1|s2|s3|s4|big SOCKET')
    cls = SHAPES[sys.argv[1]]
    Milter.factory = cls
    flags = Milter.ADDHDRS | (Milter.CHGBODY if cls is Big else 0)
    Milter.set_flags(flags)
    Milter.setbacklog(1024)
    Milter.runmilter('bench-py', sys.argv[2], 240)


if __name__ == '__main__':
    main()
