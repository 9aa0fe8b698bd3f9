from layerskip.cli import main

raise SystemExit(main())
