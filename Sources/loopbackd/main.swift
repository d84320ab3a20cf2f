import Daemon
import Glibc

exit(Daemon.main())
