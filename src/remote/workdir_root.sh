# workdir_root.sh WORKDIR: the workdir's absolute path (SFTP does not expand "~").
enter_workdir "$1" && pwd -P
