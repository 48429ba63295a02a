# bash completion for hostctl (installed as
# /usr/share/bash-completion/completions/hostctl): commands, subcommands,
# flags, and VM names from a running hostd.

_hostctl_vms() {
	hostctl vm list 2>/dev/null | awk 'NR > 1 { print $1 }'
}

_hostctl() {
	local cur prev words cword
	if declare -F _init_completion >/dev/null; then
		_init_completion || return
	else
		cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
		words=("${COMP_WORDS[@]}") cword=$COMP_CWORD
	fi
	# The command is the first word after the global flags.
	local i cmd="" sub=""
	for ((i = 1; i < cword; i++)); do
		case "${words[i]}" in
		-socket | --socket) ((i++)) ;;
		-*) ;;
		*)
			if [ -z "$cmd" ]; then cmd=${words[i]}; elif [ -z "$sub" ]; then sub=${words[i]}; fi
			;;
		esac
	done
	case "$prev" in
	-socket | --socket) COMPREPLY=($(compgen -f -- "$cur")); return ;;
	-kernel | -initrd) COMPREPLY=($(compgen -f -- "$cur")); return ;;
	-after) COMPREPLY=($(compgen -W "pause destroy resume" -- "$cur")); return ;;
	-mode) COMPREPLY=($(compgen -W "lazy full" -- "$cur")); return ;;
	-slot) COMPREPLY=($(compgen -W "auto cold" -- "$cur")); return ;;
	esac
	if [ -z "$cmd" ]; then
		COMPREPLY=($(compgen -W "-socket -json -version -h host vm connector protect unprotect protection
			evacuate evacuate-host epoch restore swap memory repo job events metrics version" -- "$cur"))
		return
	fi
	case "$cmd" in
	vm)
		if [ -z "$sub" ]; then
			COMPREPLY=($(compgen -W "list get create start shutdown destroy delete console stats wait-ready agent verify" -- "$cur"))
		elif [[ "$cur" == -* ]]; then
			case "$sub" in
			create) COMPREPLY=($(compgen -W "-memory -vcpus -kernel -initrd -cmdline -nic -served -no-start" -- "$cur")) ;;
			shutdown) COMPREPLY=($(compgen -W "-timeout -wait" -- "$cur")) ;;
			console) COMPREPLY=($(compgen -W "-n" -- "$cur")) ;;
			wait-ready) COMPREPLY=($(compgen -W "-timeout" -- "$cur")) ;;
			esac
		elif [ "$sub" != create ] && [ "$sub" != list ]; then
			COMPREPLY=($(compgen -W "$(_hostctl_vms)" -- "$cur"))
		fi
		;;
	connector) [ -z "$sub" ] && COMPREPLY=($(compgen -W "list get create retarget delete stats" -- "$cur")) ;;
	job) [ -z "$sub" ] && COMPREPLY=($(compgen -W "list get wait" -- "$cur")) ;;
	protect) COMPREPLY=($(compgen -W "-backup -bound -epoch -weight -wait $(_hostctl_vms)" -- "$cur")) ;;
	evacuate) COMPREPLY=($(compgen -W "-within -deadline -after -wait $(_hostctl_vms)" -- "$cur")) ;;
	evacuate-host) COMPREPLY=($(compgen -W "-within -wait" -- "$cur")) ;;
	restore) COMPREPLY=($(compgen -W "-backup -name -mode -restore-point -prefetch-rate -slot -wait" -- "$cur")) ;;
	swap) COMPREPLY=($(compgen -W "-size -repos -delete $(_hostctl_vms)" -- "$cur")) ;;
	unprotect | protection | epoch | memory) [ -z "$sub" ] && COMPREPLY=($(compgen -W "$(_hostctl_vms)" -- "$cur")) ;;
	esac
} && complete -F _hostctl hostctl
