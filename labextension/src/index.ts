/**
 * kernelprov's JupyterLab panel: the packed environments this server can start, whether each is
 * staged on this node, and actions on them. The data comes from the server extension's
 * `/kernelprov/envs` API (kernelprov/jupyter/routes.py); kernel starts report their staging on
 * jupyter_server's event bus (kernelprov/jupyter/events.py), shown in the status bar.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  Notification,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { Event } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import {
  CommandToolbarButton,
  refreshIcon,
  SidePanel
} from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Panel, Widget } from '@lumino/widgets';

import { environmentsIcon } from './icons';
import { EnvironmentsModel } from './model';
import { EnvironmentsView, IEnvironmentActions } from './panel';
import { IEnvironment, ServerAPI } from './request';
import { formatDuration } from './state';
import { StagingStatus, stagingEvent } from './status';

const PANEL_ID = 'kernelprov-environments';
const REFRESH_COMMAND = 'kernelprov:refresh-environments';
const OPEN_COMMAND = 'kernelprov:open-notebook';
const STAGE_COMMAND = 'kernelprov:stage';
const EVICT_COMMAND = 'kernelprov:evict';
const SHUTDOWN_COMMAND = 'kernelprov:shut-down-kernels';
const ROW_SELECTOR = '.jp-kernelprov-env';

/**
 * The side panel: polls only while it is visible.
 */
class EnvironmentsPanel extends SidePanel {
  constructor(model: EnvironmentsModel, options: SidePanel.IOptions) {
    super(options);
    this._model = model;
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._model.visible = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._model.visible = false;
  }

  dispose(): void {
    this._model.dispose();
    super.dispose();
  }

  private _model: EnvironmentsModel;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kernelprov:environments',
  description:
    'A side panel with the packed conda environments of kernelprov and their state on this node.',
  autoStart: true,
  requires: [IDocumentManager],
  optional: [ILayoutRestorer, ITranslator, IDefaultFileBrowser, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    docManager: IDocumentManager,
    restorer: ILayoutRestorer | null,
    translator: ITranslator | null,
    fileBrowser: IDefaultFileBrowser | null,
    statusBar: IStatusBar | null
  ): void => {
    translator = translator ?? nullTranslator;
    const trans = translator.load('kernelprov');
    const { serviceManager } = app;
    const model = new EnvironmentsModel(
      new ServerAPI(serviceManager.serverSettings)
    );
    const runningOf = (env: IEnvironment) =>
      Array.from(serviceManager.kernels.running()).filter(
        kernel => kernel.name === env.name
      );

    const actions: IEnvironmentActions = {
      // The kernel first, the notebook once it runs: a start that fails leaves no UntitledN.ipynb.
      openNotebook: async (env: IEnvironment) => {
        let kernelId: string;
        try {
          kernelId = await model.run(env.name, 'open', async () => {
            const kernel = await serviceManager.kernels.startNew({
              name: env.name
            });
            const id = kernel.id;
            kernel.dispose(); // the notebook's session connects to it again
            return id;
          });
        } catch (reason) {
          void showErrorMessage(trans.__('Error Starting Kernel'), {
            message: (reason as Error).message
          });
          return;
        }
        try {
          const file = await docManager.newUntitled({
            path: fileBrowser?.model.path ?? '',
            type: 'notebook'
          });
          docManager.open(file.path, 'default', {
            id: kernelId,
            name: env.name
          });
        } catch (reason) {
          await serviceManager.kernels
            .shutdown(kernelId)
            .catch(() => undefined);
          void showErrorMessage(
            trans.__('Cannot open a notebook on %1', env.display_name),
            reason as Error
          );
        }
      },
      stage: async (env: IEnvironment) => {
        try {
          await model.stage(env.name);
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot stage %1', env.display_name),
            reason as Error
          );
        }
      },
      evict: async (env: IEnvironment) => {
        const result = await showDialog({
          title: trans.__('Evict %1?', env.display_name),
          body: trans.__(
            'Its staged copy on this node is removed; the next kernel start unpacks it again.'
          ),
          buttons: [
            Dialog.cancelButton({ label: trans.__('Cancel') }),
            Dialog.warnButton({ label: trans.__('Evict') })
          ]
        });
        if (!result.button.accept) {
          return;
        }
        try {
          await model.evict(env.name);
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot evict %1', env.display_name),
            reason as Error
          );
        }
      },
      shutDownKernels: async (env: IEnvironment) => {
        const kernels = runningOf(env);
        const result = await showDialog({
          title: trans._n(
            'Shut down the kernel using %2?',
            'Shut down the %1 kernels using %2?',
            kernels.length,
            env.display_name
          ),
          body: trans.__(
            'Unsaved variables in those kernels are lost; their notebooks stay open.'
          ),
          buttons: [
            Dialog.cancelButton({ label: trans.__('Cancel') }),
            Dialog.warnButton({ label: trans.__('Shut Down') })
          ]
        });
        if (!result.button.accept) {
          return;
        }
        try {
          await model.run(env.name, 'shutdown', () =>
            Promise.all(
              kernels.map(kernel => serviceManager.kernels.shutdown(kernel.id))
            )
          );
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot shut down the kernels of %1', env.display_name),
            reason as Error
          );
        }
      },
      runningKernels: (env: IEnvironment) => runningOf(env).length
    };

    // A stage the panel watched ended: say so, wherever the researcher is looking.
    model.stageEnded.connect((_, ended) => {
      if (ended.ok) {
        Notification.success(
          trans.__('%1 is staged on this node.', ended.env.display_name),
          { autoClose: 5000 }
        );
      } else {
        Notification.error(
          trans.__(
            'Staging %1 failed: %2',
            ended.env.display_name,
            ended.message ?? ''
          ),
          { autoClose: false }
        );
      }
    });

    const panel = new EnvironmentsPanel(model, {
      content: new Panel(),
      translator
    });
    panel.id = PANEL_ID;
    panel.addClass('jp-kernelprov-panel');
    panel.title.icon = environmentsIcon;
    panel.title.caption = trans.__('Environments');
    panel.node.setAttribute('role', 'region');
    panel.node.setAttribute('aria-label', trans.__('Environments'));

    const heading = new Widget({ node: document.createElement('h2') });
    heading.node.textContent = trans.__('Environments');
    heading.addClass('jp-kernelprov-title');
    panel.header.addWidget(heading);
    app.commands.addCommand(REFRESH_COMMAND, {
      label: trans.__('Refresh Environments'),
      caption: trans.__('Refresh the list of environments'),
      icon: refreshIcon,
      execute: async () => {
        await serviceManager.kernelspecs.refreshSpecs();
        await model.refresh();
      }
    });
    panel.toolbar.addItem(
      'refresh',
      new CommandToolbarButton({
        commands: app.commands,
        id: REFRESH_COMMAND,
        label: ''
      })
    );
    panel.addWidget(new EnvironmentsView(model, actions, trans));

    // The same actions on a row's context menu.
    const rowEnv = (): IEnvironment | undefined => {
      const node = app.contextMenuHitTest(n => n.matches(ROW_SELECTOR));
      const name = node?.getAttribute('data-kernel-name');
      return model.environments.find(env => env.name === name);
    };
    const rowCommand = (
      id: string,
      label: (env?: IEnvironment) => string,
      enabled: (env: IEnvironment) => boolean,
      run: (env: IEnvironment) => void
    ) => {
      app.commands.addCommand(id, {
        label: () => label(rowEnv()),
        isEnabled: () => {
          const env = rowEnv();
          return !!env && model.connected && enabled(env);
        },
        execute: () => {
          const env = rowEnv();
          if (env) {
            run(env);
          }
        }
      });
      app.contextMenu.addItem({ command: id, selector: ROW_SELECTOR, rank: 0 });
    };
    rowCommand(
      OPEN_COMMAND,
      () => trans.__('Open Notebook'),
      env => !env.problems.length && !model.busyWith(env.name),
      env => actions.openNotebook(env)
    );
    rowCommand(
      STAGE_COMMAND,
      () => trans.__('Stage Now'),
      env =>
        !env.problems.length &&
        !env.staged &&
        !(env.staging && !env.staging.error) &&
        !model.busyWith(env.name),
      env => actions.stage(env)
    );
    rowCommand(
      EVICT_COMMAND,
      () => trans.__('Evict'),
      env => !!env.staged && !env.staged.in_use && !model.busyWith(env.name),
      env => actions.evict(env)
    );
    rowCommand(
      SHUTDOWN_COMMAND,
      env =>
        trans._n(
          'Shut Down the Kernel Using It',
          'Shut Down the %1 Kernels Using It',
          env ? Math.max(1, actions.runningKernels(env)) : 1
        ),
      env => actions.runningKernels(env) > 0,
      env => actions.shutDownKernels(env)
    );

    // Kernel starts anywhere in JupyterLab (a notebook, the launcher) report their staging on the
    // event bus: the status bar shows it, and the panel follows that row closely.
    const status = new StagingStatus(trans);
    if (statusBar) {
      statusBar.registerStatusItem('kernelprov:staging', {
        item: status,
        align: 'left',
        rank: 4,
        isActive: () => status.active,
        activeStateChanged: status.changed
      });
    }
    serviceManager.events.stream.connect(
      (_: Event.IManager, emission: Event.Emission) => {
        const event = stagingEvent(emission);
        if (!event) {
          return;
        }
        status.take(event);
        if (event.kernel_name) {
          if (event.action === 'started' || event.action === 'queued') {
            model.watch(event.kernel_name);
          } else if (event.action !== 'progress') {
            model.unwatch(event.kernel_name);
          }
        }
        if (!event.kernel_id) {
          return; // the panel's own Stage now: the model notifies when it ends
        }
        const who = event.display_name ?? event.kernel_name ?? '';
        // A failed start has JupyterLab's own "Error Starting Kernel" dialog.
        if (event.action === 'finished' && event.outcome === 'unpacked') {
          Notification.info(
            trans.__(
              '%1 was unpacked onto this node in %2.',
              who,
              formatDuration(event.seconds ?? 0)
            ),
            { autoClose: 5000 }
          );
        }
      }
    );

    app.shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
    }
    // Kernels installed or removed (`kernelprov install/remove`) show up here too, and the
    // "Shut down the N kernels" action follows the running kernels.
    serviceManager.kernelspecs.specsChanged.connect(() => void model.refresh());
    serviceManager.kernels.runningChanged.connect(() => void model.refresh());
    void model.start();
  }
};

export default plugin;
