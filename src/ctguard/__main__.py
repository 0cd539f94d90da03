from ctguard.cli.main import main

raise SystemExit(main())
